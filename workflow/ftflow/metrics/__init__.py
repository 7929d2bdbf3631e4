"""Task metrics as `evaluate` modules shipped with ftflow, loaded by path.

`evaluate.load("<name>")` fetches metric code from the hub, which is not
always reachable; `evaluate.load(<local folder>)` is the same API offline.
"""

from __future__ import annotations

import functools
import os

HERE = os.path.dirname(os.path.abspath(__file__))
# The metrics shipped: one folder per metric, holding <name>/<name>.py. The names a config may
# use, and the numbers each writes, are the schema's `$defs.metric` (read by the planner).
NAMES = tuple(sorted(entry for entry in os.listdir(HERE) if os.path.isfile(os.path.join(HERE, entry, f"{entry}.py"))))


def metric_value(result: dict, name: str):
    """A number of an eval/metrics.json: a task metric under its `metrics`, else the split's loss
    (eval_loss, perplexity) at the top; None when it has neither."""
    return (result.get("metrics") or {}).get(name, result.get(name))


@functools.lru_cache(maxsize=None)
def load_metric(name: str):
    import evaluate

    if name not in NAMES:
        raise KeyError(f"unknown metric {name!r}; one of {', '.join(NAMES)}")
    return evaluate.load(os.path.join(HERE, name, f"{name}.py"))


def compute(name: str, predictions: list[str], references: list[str]) -> dict:
    return load_metric(name).compute(predictions=predictions, references=references)
