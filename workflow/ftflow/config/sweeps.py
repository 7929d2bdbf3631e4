"""Sweeps: a base experiment expanded over a grid (or a list) of dotted-key overrides.

The schema sees a sweep's grid only as a mapping, so every dotted key is
checked here, against the keys an experiment and its sections accept.
"""

from __future__ import annotations

import copy
import itertools
import re
from typing import Any

from ..errors import ConfigError
from .checks import check_keys, check_name, did_you_mean
from .schema import EXPERIMENT_KEYS, SWEEP_KEYS
from .sections import section_keys


def expand_sweeps(raw: dict) -> dict[str, dict]:
    """Return {experiment name: raw experiment} including sweep-generated ones.

    A generated experiment carries `_sweep: {name, params}`: the sweep and the
    point it came from, for the report's columns.
    """
    experiments: dict[str, dict] = {}
    for name, exp in (raw.get("experiments") or {}).items():
        check_name(f"experiments.{name}", name, "experiment")
        experiments[name] = exp if exp is not None else {}
    for sweep_name, sweep in (raw.get("sweeps") or {}).items():
        path = f"sweeps.{sweep_name}"
        check_name(path, sweep_name, "sweep")
        check_keys(path, sweep, SWEEP_KEYS)
        if "base" in sweep:
            base_name = sweep["base"]
            if base_name not in (raw.get("experiments") or {}):
                raise ConfigError(f"{path}.base", f"unknown experiment {base_name!r}")
            base = copy.deepcopy(experiments[base_name])
        else:
            base = copy.deepcopy(sweep.get("experiment") or {})
        points = _sweep_points(sweep, path)
        width = len(str(len(points)))
        for i, point in enumerate(points, start=1):
            exp = copy.deepcopy(base)
            for dotted, value in point.items():
                _check_override_key(dotted, f"{path}.grid.{dotted}")
                _set_dotted(exp, dotted, value, f"{path}.grid.{dotted}")
            exp_name = _experiment_name(sweep, sweep_name, path, i, point, width)
            check_name(f"{path}.name", exp_name, "generated experiment")
            if exp_name in experiments:
                raise ConfigError(
                    f"{path}.name",
                    f"generated experiment name {exp_name!r} is already taken",
                    "give the sweep a 'name' template that makes names unique",
                )
            exp["_sweep"] = {"name": sweep_name, "params": point}
            experiments[exp_name] = exp
    return experiments


def _experiment_name(sweep: dict, sweep_name: str, path: str, i: int, point: dict, width: int) -> str:
    if "name" not in sweep:
        return f"{sweep_name}-{i:0{width}d}"
    leaves = {k.split(".")[-1]: _render_value(v) for k, v in point.items()}
    try:
        return sweep["name"].format(sweep=sweep_name, i=i, **leaves)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            f"{path}.name",
            f"cannot format name: {err}",
            "use {sweep}, {i} and the last part of each varied key, e.g. {learning_rate}",
        ) from None


def _sweep_points(sweep: dict, path: str) -> list[dict]:
    if ("grid" in sweep) == ("list" in sweep):
        raise ConfigError(path, "a sweep needs exactly one of 'grid' or 'list'")
    if "list" in sweep:
        points = sweep["list"]
        if not isinstance(points, list) or not points or not all(isinstance(p, dict) for p in points):
            raise ConfigError(f"{path}.list", "expected a non-empty list of {dotted.key: value} mappings")
        return [dict(p) for p in points]
    grid = sweep["grid"]
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{path}.grid", "expected a mapping of dotted keys to lists of values")
    axes = []
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}.grid.{key}", "expected a non-empty list of values")
        keys = [k.strip() for k in str(key).split(",")]
        if len(keys) > 1:  # tied keys: "lora.r,lora.lora_alpha": [[8, 32], [16, 64]]
            axis = []
            for value in values:
                if not isinstance(value, list) or len(value) != len(keys):
                    raise ConfigError(f"{path}.grid.{key}", f"each value must be a list of {len(keys)} items")
                axis.append(dict(zip(keys, value)))
        else:
            axis = [{keys[0]: value} for value in values]
        axes.append(axis)
    return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*axes)]


def _check_override_key(dotted: str, path: str) -> None:
    """A dotted key names an experiment key and, inside a section, one of the section's keys."""
    keys = dotted.split(".")
    if keys[0] == "stages":
        keys = keys[2:]
    if not keys or keys[0] not in EXPERIMENT_KEYS:
        raise ConfigError(path, f"unknown key {dotted!r}", did_you_mean(keys[0] if keys else dotted, EXPERIMENT_KEYS))
    if len(keys) > 1:
        section, key = keys[0], keys[1]
        allowed = section_keys(section)
        if allowed is not None and key not in allowed:
            raise ConfigError(path, f"unknown key {dotted!r}", did_you_mean(key, allowed, prefix=f"{section}."))


def _set_dotted(target: dict, dotted: str, value: Any, path: str) -> None:
    """Set `a.b.c` in a raw experiment; `stages.<name or index>.x` reaches into one stage."""
    keys = dotted.split(".")
    node = target
    for i, key in enumerate(keys[:-1]):
        if key == "stages" and isinstance(node.get("stages"), list):
            selector = keys[i + 1]
            chosen = None
            for j, stage in enumerate(node["stages"]):
                if selector == str(j) or stage.get("name") == selector:
                    chosen = stage
            if chosen is None:
                raise ConfigError(path, f"no stage {selector!r} in the base experiment")
            _set_dotted(chosen, ".".join(keys[i + 2 :]), value, path)
            return
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(path, f"cannot set {dotted!r}: {key!r} is not a mapping")
        node = child
    node[keys[-1]] = value


def _render_value(value: Any) -> str:
    """A swept value as it appears in a generated name: 3e-4 -> '0.0003', True -> 'on'."""
    if isinstance(value, bool):
        return "on" if value else "off"
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9._-]", "", text.replace("+", ""))
