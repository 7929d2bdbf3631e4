"""Task metrics as `evaluate` modules shipped with ftflow, loaded by path.

`evaluate.load("<name>")` fetches metric code from the hub, which is not
always reachable; `evaluate.load(<local folder>)` is the same API offline.
"""

from __future__ import annotations

import functools
import os

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = ("exact_match", "json_field_accuracy", "rouge", "chrf", "bleu")


@functools.lru_cache(maxsize=None)
def load_metric(name: str):
    import evaluate

    if name not in NAMES:
        raise KeyError(f"unknown metric {name!r}; one of {', '.join(NAMES)}")
    return evaluate.load(os.path.join(HERE, name, f"{name}.py"))


def compute(name: str, predictions: list[str], references: list[str]) -> dict:
    return load_metric(name).compute(predictions=predictions, references=references)
