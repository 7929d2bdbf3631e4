"""Reading config files: YAML with duplicate keys caught, layered as Snakemake layers them."""

from __future__ import annotations

import copy
import os

import yaml

from ..errors import ConfigError


def deep_merge(base: dict, override: dict) -> dict:
    """Dicts merge key by key; anything else in `override` replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml(path: str | os.PathLike) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(str(path), "no such config file") from None
    except yaml.YAMLError as err:
        raise yaml_syntax_error(str(path), err) from None
    return data or {}


def yaml_syntax_error(path: str, err: yaml.YAMLError) -> ConfigError:
    """One line naming the file, line and column of a YAML syntax error, and what the parser was reading.

    Snakemake's own message for it ("Config file is not valid JSON or YAML") names none of them.
    """
    mark = getattr(err, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
    if "'\\t'" in problem:
        fix = "indent with spaces: YAML does not allow tabs"
    elif context and start:
        fix = f"{context} that starts at line {start.line + 1}, column {start.column + 1}"
    else:
        fix = context
    return ConfigError(where, f"not valid YAML: {problem}", fix)


class _DuplicateKeyLoader(yaml.SafeLoader):
    """SafeLoader that records keys given twice in one mapping (PyYAML keeps the last silently)."""

    duplicates: list

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    self.duplicates.append((key, seen[key], key_node.start_mark.line + 1))
                else:
                    seen[key] = key_node.start_mark.line + 1
            except TypeError:  # unhashable key: the schema will reject it
                pass
        return super().construct_mapping(node, deep=deep)


def check_duplicate_keys(path: str) -> None:
    """Raise a ConfigError for a key that appears twice in one mapping of a YAML file (or for its syntax).

    Two experiments with the same name would otherwise be one experiment, the
    last one, without a word.
    """
    with open(path, encoding="utf-8") as handle:
        loader = _DuplicateKeyLoader(handle)
        loader.duplicates = []
        try:
            loader.get_single_data()
        except yaml.YAMLError as err:
            raise yaml_syntax_error(path, err) from None
        finally:
            loader.dispose()
    if loader.duplicates:
        key, first, second = loader.duplicates[0]
        raise ConfigError(
            f"{path}:{second}",
            f"key {key!r} is given twice (lines {first} and {second}); YAML would keep only the last",
            "rename one of them",
        )


def normalize_raw(raw: dict | None) -> dict:
    """A deep copy with command-line strings read as YAML (`--config smoke=true` passes 'true')."""
    raw = copy.deepcopy(raw or {})
    if isinstance(raw.get("smoke"), str):
        raw["smoke"] = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(
            raw["smoke"].strip().lower(), raw["smoke"]
        )
    return raw


def load_workflow_config(configfiles: list[str], overrides: dict | None = None) -> dict:
    """Merge config files in order, then command-line overrides (as Snakemake does)."""
    merged: dict = {}
    for path in configfiles:
        merged = deep_merge(merged, load_yaml(path))
    if overrides:
        merged = deep_merge(merged, overrides)
    return merged
