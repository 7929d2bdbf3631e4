"""A stage's datasets: one name, or a mixture of several with its `mix` settings, checked before any job.

`dataset` and `mix` may come from defaults, the experiment or the stage (and
from a sweep, which the schema never sees), so every check is made here, on
the merged values, with the stage's path. What the train job does with a
mixture is in ftflow.mixing.
"""

from __future__ import annotations

import math

from ..errors import ConfigError
from ..specs import DatasetSpec, StageSpec, concat_rows
from .checks import check_choice, did_you_mean
from .datasets import known_train_rows
from .schema import MIX_DEFAULTS, MIX_STRATEGIES
from .sections import check_section


def resolve_datasets(path: str, value, mix_raw, datasets: dict[str, DatasetSpec]) -> tuple[tuple[str, ...], dict]:
    """(the stage's dataset names, its mix: {} for one dataset, else every setting filled in)."""
    if value is None:
        raise ConfigError(f"{path}.dataset", "no dataset set for this stage", "set 'dataset' here or in defaults")
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(name, str) for name in names):
        raise ConfigError(f"{path}.dataset", f"expected a dataset name or a non-empty list of names, got {value!r}")
    for name in names:
        if name not in datasets:
            raise ConfigError(
                f"{path}.dataset", f"unknown dataset {name!r}", f"defined: {', '.join(datasets) or 'none'}"
            )
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(
                f"{path}.dataset",
                f"{name!r} is listed twice",
                "list each dataset once; a mix weight above 1 repeats rows",
            )
    if len(names) == 1:
        if mix_raw is not None:
            raise ConfigError(
                f"{path}.mix",
                f"mixes a list of datasets, and this stage trains on {names[0]!r} alone",
                "remove mix, or set mix: null where an inherited one should stop",
            )
        return (names[0],), {}
    return tuple(names), _resolve_mix(f"{path}.mix", mix_raw or {}, names)


def _resolve_mix(path: str, raw, names: list[str]) -> dict:
    mix = {**MIX_DEFAULTS, **check_section(path, "mix", raw)}
    check_choice(f"{path}.strategy", mix["strategy"], MIX_STRATEGIES, "mix strategy")
    seed = mix["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"{path}.seed", f"must be an integer >= 0, got {seed!r}")
    weights = mix["weights"]
    if not isinstance(weights, dict):
        raise ConfigError(f"{path}.weights", f"expected a mapping of dataset name to weight, got {weights!r}")
    for name, weight in weights.items():
        if name not in names:
            hint = did_you_mean(name, names) or "give weights only to the datasets this stage lists"
            raise ConfigError(
                f"{path}.weights.{name}", f"{name!r} is not in the dataset list [{', '.join(names)}]", hint
            )
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"{path}.weights.{name}", f"must be a number >= 0, got {weight!r}")
    full = {name: float(weights.get(name, 1.0)) for name in names}
    if not any(full.values()):
        effect = "interleave has no member to draw from" if mix["strategy"] == "interleave" else "concat takes no row"
        raise ConfigError(
            f"{path}.weights", f"every weight is 0: {effect}", "give at least one member a weight above 0"
        )
    return {"strategy": mix["strategy"], "weights": full, "seed": seed}


def planned_train_rows(stage: StageSpec, datasets: dict[str, DatasetSpec], workdir: str) -> int | None:
    """The stage's training rows where known before tokenizing (see known_train_rows); an interleaved
    mixture's length comes from its draws and is counted at train time."""
    counts = [known_train_rows(datasets[name], workdir) for name in stage.datasets]
    if any(count is None for count in counts):
        return None
    if not stage.is_mixture:
        return counts[0]
    if stage.mix["strategy"] != "concat":
        return None
    return sum(concat_rows(count, stage.mix["weights"][name]) for name, count in zip(stage.datasets, counts))
