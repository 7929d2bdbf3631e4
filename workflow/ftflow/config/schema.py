"""The config schema (workflow/schemas/config.schema.yaml): the one source of defaults and enums.

It is read once per process. The planner validates a raw config against it
(the only schema check of a parse: one line naming the path at fault) and
takes from it every default it fills in and every set of allowed values it
checks, so the schema a user reads is the behaviour they get.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..methods import METHODS
from .checks import check_name, did_you_mean

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "config.schema.yaml"
# The numbers evaluation writes for every experiment, whatever its task metrics.
LOSS_METRICS = ("eval_loss", "perplexity")


def _load() -> dict:
    # libyaml's loader reads the schema about ten times faster than the pure-Python one,
    # and the schema is read on every `snakemake` invocation.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(SCHEMA_PATH, encoding="utf-8") as handle:
        schema = yaml.load(handle, Loader=loader)
    methods = schema["$defs"]["stage_keys"]["properties"]["method"]["enum"]
    if set(methods) != set(METHODS):
        # A programming error, not a config error: the two lists are edited together.
        raise RuntimeError(f"the schema's method enum {methods} differs from ftflow.methods.METHODS {list(METHODS)}")
    metric = schema["$defs"]["metric"]
    if list(metric["x-outputs"]) != metric["enum"]:
        raise RuntimeError("the schema's metric enum and its x-outputs table name different metrics")
    return schema


SCHEMA = _load()
_STAGE = SCHEMA["$defs"]["stage_keys"]["properties"]
_DATASET = SCHEMA["properties"]["datasets"]["additionalProperties"]["properties"]
_MODEL = SCHEMA["properties"]["models"]["additionalProperties"]["properties"]


def section_defaults(section: dict) -> dict[str, Any]:
    """A mapping section's defaults: its own `default` when its keys are open
    (training, lora, adalora take any field of the library class), else each property's."""
    if "default" in section:
        return section["default"]
    return {key: prop["default"] for key, prop in section["properties"].items() if "default" in prop}


# ------------------------------------------------------------------ defaults

TRAINING_DEFAULTS = section_defaults(_STAGE["training"])
LORA_DEFAULTS = section_defaults(_STAGE["lora"])
ADALORA_DEFAULTS = section_defaults(_STAGE["adalora"])
QUANTIZATION_DEFAULTS = section_defaults(_STAGE["quantization"])
DIVERGENCE_DEFAULTS = section_defaults(_STAGE["divergence"])
# mix's own default is null (one dataset); a mixture's settings default key by key.
MIX_DEFAULTS = {key: prop["default"] for key, prop in _STAGE["mix"]["properties"].items()}
EVAL_DEFAULTS = section_defaults(SCHEMA["$defs"]["eval"])
SMOKE_DEFAULTS = section_defaults(SCHEMA["properties"]["smoke_options"])
REPORT_DEFAULTS = section_defaults(SCHEMA["properties"]["report"])
# Scalar stage keys (method, init_from, max_length, packing, gpus) and mix (null: one dataset).
STAGE_DEFAULTS = {
    key: prop["default"] for key, prop in _STAGE.items() if "default" in prop and prop.get("type") != "object"
}
DATASET_DEFAULTS = {key: prop["default"] for key, prop in _DATASET.items() if "default" in prop}
MODEL_DEFAULTS = {key: prop["default"] for key, prop in _MODEL.items() if "default" in prop}

# ------------------------------------------------------------------ enums and keys

METHOD_NAMES = tuple(_STAGE["method"]["enum"])
INIT_FROM = tuple(_STAGE["init_from"]["enum"])
MIX_STRATEGIES = tuple(_STAGE["mix"]["properties"]["strategy"]["enum"])
LOSS_ON = tuple(v for v in _DATASET["loss_on"]["enum"] if v is not None)
# Chat formats: each one's columns under LLaMA-Factory's keys, sharegpt's turn keys and roles.
FORMATS = tuple(_DATASET["format"]["enum"])
FORMAT_COLUMNS: dict[str, dict[str, str]] = _DATASET["columns"]["x-by-format"]
TAG_DEFAULTS = {key: prop["default"] for key, prop in _DATASET["tags"]["properties"].items()}
TRAINABLE_ROLES = tuple(_DATASET["roles_to_train"]["items"]["enum"])
METRICS = tuple(SCHEMA["$defs"]["metric"]["enum"])
METRIC_OUTPUTS: dict[str, tuple[str, ...]] = {
    name: tuple(out) for name, out in SCHEMA["$defs"]["metric"]["x-outputs"].items()
}

# Mapping sections that merge key by key across defaults, experiment and stage.
DICT_SECTIONS = (*(key for key, prop in _STAGE.items() if prop.get("type") == "object"), "eval")
STAGE_KEYS = ("name", *_STAGE)
DEFAULT_KEYS = (*_STAGE, *SCHEMA["properties"]["defaults"]["properties"])
EXPERIMENT_KEYS = (*_STAGE, *SCHEMA["properties"]["experiments"]["additionalProperties"]["properties"])
SWEEP_KEYS = tuple(SCHEMA["properties"]["sweeps"]["additionalProperties"]["properties"])
# Sections whose keys the schema lists (training, lora and adalora are checked against the libraries).
SECTION_KEYS = {
    "quantization": tuple(_STAGE["quantization"]["properties"]),
    "divergence": tuple(_STAGE["divergence"]["properties"]),
    "mix": tuple(_STAGE["mix"]["properties"]),
    "eval": tuple(EVAL_DEFAULTS),
}


def primary_metric_choices(metrics) -> tuple[str, ...]:
    """The numbers an evaluation with these task metrics reports, any of which can rank the report."""
    return (*[out for m in metrics for out in METRIC_OUTPUTS[m]], *LOSS_METRICS)


# ------------------------------------------------------------------ validation


@functools.lru_cache(maxsize=1)
def _validator():
    import jsonschema  # a third of a second to import; only a parse that validates pays it

    return jsonschema.Draft202012Validator(SCHEMA)


def check_against_schema(raw: dict) -> None:
    """Validate against the JSON Schema; raise the first error as a ConfigError with its path."""
    errors = sorted(
        _validator().iter_errors(raw), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path)))
    )
    if not errors:
        return
    error = errors[0]
    path = format_path(error.absolute_path)
    if "propertyNames" in error.schema_path:
        section = {"experiments": "experiment", "models": "model", "datasets": "dataset", "sweeps": "sweep"}
        check_name(f"{path}.{error.instance}", error.instance, section.get(path, "entry"))
    if error.validator == "additionalProperties":
        extra = re.findall(r"'([^']+)' was unexpected", error.message)
        if extra:
            allowed = list(error.schema.get("properties", {}))
            raise ConfigError(
                format_path([*error.absolute_path, extra[0]]),
                "unknown key",
                did_you_mean(extra[0], allowed) or f"allowed keys: {', '.join(allowed)}",
            )
    raise ConfigError(path or "config", error.message)


def format_path(parts) -> str:
    """A config path as users write it: experiments.e1.stages[0].lora."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out
