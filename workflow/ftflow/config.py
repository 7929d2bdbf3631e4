"""Config model: one YAML file of models, datasets, defaults, experiments and sweeps.

`build_plan(raw)` validates the raw config (JSON Schema, then key-by-key checks
that name the exact path at fault), expands sweeps, resolves every stage
(defaults <- experiment <- stage) into typed dataclasses and returns a `Plan`:
everything the Snakefile needs, computed once. Nothing here imports torch or
transformers, so planning a 500-experiment DAG stays fast.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import fields as libfields
from .errors import ConfigError
from .hashing import canonical_json, content_hash  # noqa: F401  (re-exported for the planner)
from .schedule import BatchSplitError, adalora_schedule_problem, optimizer_steps, per_process_batch, smoke_adalora_schedule  # noqa: F401
from .specs import FORMAT_VERSION, DatasetSpec, DataSpec, EvalSpec, ExperimentSpec, ModelSpec, StageSpec  # noqa: F401

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
METHODS = ("full", "lora", "qlora", "adalora")
KINDS = ("text", "instruction", "chat")
METRICS = ("exact_match", "json_field_accuracy", "rouge", "chrf", "bleu")
# The numbers each metric writes to eval/metrics.json (any can be a primary
# metric); the first is the primary metric when the config names none.
METRIC_OUTPUTS = {
    "exact_match": ("exact_match",),
    "json_field_accuracy": ("json_field_accuracy", "invalid_json", "invalid_json_rate"),
    "rouge": ("rougeL", "rouge1", "rouge2"),
    "chrf": ("chrf",),
    "bleu": ("bleu",),
}
LOSS_METRICS = ("eval_loss", "perplexity")


def primary_metric_choices(metrics) -> tuple:
    return (*[out for m in metrics for out in METRIC_OUTPUTS[m]], *LOSS_METRICS)
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "config.schema.yaml"

# TrainingArguments fields that ftflow sets itself; a user value would be ignored or break the DAG.
RESERVED_TRAINING_KEYS = {
    "output_dir": "ftflow writes to results/{experiment}/{stage}/",
    "report_to": "ftflow always logs to TensorBoard in {stage}/tb/",
    "resume_from_checkpoint": "ftflow resumes from the stage's last checkpoint by itself",
    "push_to_hub": "ftflow does not upload",
    "hub_model_id": "ftflow does not upload",
    "hub_token": "ftflow does not upload",
    "do_train": "set by ftflow",
    "do_eval": "set by ftflow",
    "do_predict": "set by ftflow",
    "local_rank": "set by the launcher",
    "remove_unused_columns": "ftflow's collator needs every column",
    "run_name": "set to the experiment/stage name",
}

# ftflow's own defaults for TrainingArguments, applied under the user's values.
TRAINING_DEFAULTS: dict[str, Any] = {
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "learning_rate": 2.0e-4,
    "num_train_epochs": 1.0,
    "lr_scheduler_type": "linear",
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": 50,
    "save_total_limit": 2,
    "seed": 42,
    "disable_tqdm": True,
}

LORA_DEFAULTS: dict[str, Any] = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "target_modules": "all-linear",
    "bias": "none",
}

ADALORA_DEFAULTS: dict[str, Any] = {
    "init_r": 12,
    "target_r": 8,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "target_modules": "all-linear",
    "tinit": 0,
    "tfinal": 0,
    "deltaT": 1,
    "beta1": 0.85,
    "beta2": 0.85,
    "orth_reg_weight": 0.5,
}

QUANTIZATION_DEFAULTS: dict[str, Any] = {
    "bits": 4,
    "quant_type": "nf4",
    "double_quant": True,
    "compute_dtype": "float32",
}

DIVERGENCE_DEFAULTS: dict[str, Any] = {"factor": 10.0, "warmup_steps": 1}

EVAL_DEFAULTS: dict[str, Any] = {
    "dataset": None,
    "split": "test",
    "loss_split": "validation",
    "max_new_tokens": 128,
    "batch_size": 16,
    "do_sample": False,
    "temperature": 1.0,
    "top_p": 1.0,
    "max_examples": None,
    "metrics": None,
    "primary_metric": None,
}

SMOKE_DEFAULTS: dict[str, Any] = {
    "max_steps": 3,
    "train_rows": 32,
    "eval_rows": 8,
    "max_new_tokens": 16,
    "max_length": 128,
}

STAGE_KEYS = (
    "name",
    "dataset",
    "method",
    "init_from",
    "max_length",
    "packing",
    "lora",
    "adalora",
    "quantization",
    "training",
    "divergence",
    "gpus",
)
EXPERIMENT_ONLY_KEYS = ("model", "stages", "eval", "description", "baseline")
DEFAULT_KEYS = tuple(k for k in STAGE_KEYS if k != "name") + ("model", "eval")
EXPERIMENT_KEYS = DEFAULT_KEYS + ("stages", "description", "baseline")
DICT_SECTIONS = ("lora", "adalora", "quantization", "training", "divergence", "eval")


@dataclass
class Plan:
    models: dict[str, ModelSpec]
    datasets: dict[str, DatasetSpec]
    experiments: dict[str, ExperimentSpec]
    data: dict[str, DataSpec]
    smoke: bool
    results: str = "results"

    def model_dir_name(self, model: str) -> str:
        return f"{model}.smoke" if self.smoke else model

    def write_specs(self) -> list[str]:
        """Write config.json per experiment and spec files per model and data job.

        A file is rewritten only when its content changes, so its mtime tells
        Snakemake exactly which jobs are out of date. Returns the paths written.
        """
        written = []
        for exp in self.experiments.values():
            path = os.path.join(self.results, exp.name, "config.json")
            if write_if_changed(path, exp.to_json()):
                written.append(path)
        for name, model in self.models.items():
            spec = {"model": asdict(model), "smoke": self.smoke, "format_version": FORMAT_VERSION}
            path = os.path.join(self.results, "models", self.model_dir_name(name) + ".json")
            if write_if_changed(path, spec):
                written.append(path)
        for data_id, data in self.data.items():
            # Only what changes the tokens: editing a dataset's metrics rewrites no spec, re-runs no tokenize job.
            spec = {**data.settings, "data_id": data_id, "dataset": data.dataset.name, "model": data.model}
            spec["model_dir"] = os.path.join(self.results, "models", self.model_dir_name(data.model))
            path = os.path.join(self.results, "data", data_id + ".json")
            if write_if_changed(path, spec):
                written.append(path)
        return written

    def summary(self) -> list[dict]:
        rows = []
        for exp in self.experiments.values():
            rows.append(
                {
                    "experiment": exp.name,
                    "model": exp.model,
                    "baseline": exp.baseline,
                    "sweep": exp.sweep,
                    "stages": [
                        {"name": s.name, "method": s.method, "dataset": s.dataset, "data_id": s.data_id}
                        for s in exp.stages
                    ],
                    "eval_data_id": exp.eval.data_id,
                    "config_hash": exp.config_hash,
                }
            )
        return rows


# --------------------------------------------------------------------------- helpers


def write_if_changed(path: str, data: Any) -> bool:
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"
    try:
        with open(path, encoding="utf-8") as handle:
            if handle.read() == text:
                return False
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)
    return True


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
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    return data or {}


def check_name(path: str, name: Any, what: str) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise ConfigError(
            path,
            f"invalid {what} name {name!r}",
            "use letters, digits, '.', '_' and '-', starting with a letter or digit; no '/' or '..'",
        )


def check_keys(path: str, section: Any, allowed, what: str = "key") -> None:
    if not isinstance(section, dict):
        raise ConfigError(path, f"expected a mapping, got {type(section).__name__}")
    for key in section:
        if key not in allowed:
            hint = _close_match(key, allowed)
            raise ConfigError(f"{path}.{key}", f"unknown {what}", f"did you mean {hint!r}?" if hint else None)


def _close_match(key: Any, allowed) -> str | None:
    import difflib

    matches = difflib.get_close_matches(str(key), [str(a) for a in allowed], n=1, cutoff=0.75)
    return matches[0] if matches else None


# --------------------------------------------------------------------------- schema


def schema_errors(raw: dict, schema_path: Path = SCHEMA_PATH) -> None:
    """Validate against the JSON Schema; raise the first error as a ConfigError with its path."""
    import jsonschema

    schema = load_yaml(schema_path)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(raw), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if not errors:
        return
    error = errors[0]
    path = _format_path(error.absolute_path)
    if "propertyNames" in error.schema_path:
        section = {"experiments": "experiment", "models": "model", "datasets": "dataset", "sweeps": "sweep"}
        check_name(f"{path}.{error.instance}", error.instance, section.get(path, "entry"))
    if error.validator == "additionalProperties":
        extra = re.findall(r"'([^']+)' was unexpected", error.message)
        if extra:
            allowed = list(error.schema.get("properties", {}))
            hint = _close_match(extra[0], allowed)
            raise ConfigError(
                _format_path([*error.absolute_path, extra[0]]),
                "unknown key",
                f"did you mean {hint!r}?" if hint else f"allowed keys: {', '.join(allowed)}",
            )
    raise ConfigError(path or "config", error.message)


def _format_path(parts) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


# --------------------------------------------------------------------------- sweeps


def _set_dotted(target: dict, dotted: str, value: Any, path: str) -> None:
    keys = dotted.split(".")
    node = target
    for i, key in enumerate(keys[:-1]):
        if key == "stages" and isinstance(node.get("stages"), list):
            selector = keys[i + 1]
            stages = node["stages"]
            chosen = None
            for j, stage in enumerate(stages):
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


def _check_override_key(dotted: str, path: str) -> None:
    keys = dotted.split(".")
    if keys[0] == "stages":
        keys = keys[2:]
    if not keys or keys[0] not in EXPERIMENT_KEYS:
        hint = _close_match(keys[0] if keys else dotted, EXPERIMENT_KEYS)
        raise ConfigError(path, f"unknown key {dotted!r}", f"did you mean {hint!r}?" if hint else None)
    if len(keys) > 1:
        section, key = keys[0], keys[1]
        allowed = _section_keys(section)
        if allowed is not None and key not in allowed:
            hint = _close_match(key, allowed)
            raise ConfigError(path, f"unknown key {dotted!r}", f"did you mean '{section}.{hint}'?" if hint else None)


def _render_value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9._-]", "", text.replace("+", ""))


def expand_sweeps(raw: dict) -> dict[str, dict]:
    """Return {experiment name: raw experiment} including sweep-generated ones."""
    experiments: dict[str, dict] = {}
    for name, exp in (raw.get("experiments") or {}).items():
        check_name(f"experiments.{name}", name, "experiment")
        experiments[name] = exp if exp is not None else {}
    for sweep_name, sweep in (raw.get("sweeps") or {}).items():
        path = f"sweeps.{sweep_name}"
        check_name(path, sweep_name, "sweep")
        check_keys(path, sweep, ("base", "experiment", "grid", "list", "name", "description"))
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
            if "name" in sweep:
                leaves = {k.split(".")[-1]: _render_value(v) for k, v in point.items()}
                try:
                    exp_name = sweep["name"].format(sweep=sweep_name, i=i, **leaves)
                except (KeyError, IndexError, ValueError) as err:
                    raise ConfigError(f"{path}.name", f"cannot format name: {err}", "use {sweep}, {i} and the last part of each varied key, e.g. {learning_rate}")
            else:
                exp_name = f"{sweep_name}-{i:0{width}d}"
            check_name(f"{path}.name", exp_name, "generated experiment")
            if exp_name in experiments:
                raise ConfigError(f"{path}.name", f"generated experiment name {exp_name!r} is already taken", "give the sweep a 'name' template that makes names unique")
            exp["_sweep"] = {"name": sweep_name, "params": point}
            experiments[exp_name] = exp
    return experiments


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


# --------------------------------------------------------------------------- sections


def _section_keys(section: str):
    if section == "training":
        return libfields.training_argument_fields()
    if section == "lora":
        return libfields.lora_fields()
    if section == "adalora":
        return libfields.adalora_fields()
    if section == "quantization":
        return QUANTIZATION_DEFAULTS
    if section == "divergence":
        return DIVERGENCE_DEFAULTS
    if section == "eval":
        return EVAL_DEFAULTS
    return None


def _check_section(path: str, section: str, values: dict) -> dict:
    """Check keys and simple types of one section; return it with lax YAML values converted."""
    if not isinstance(values, dict):
        raise ConfigError(path, f"expected a mapping, got {type(values).__name__}")
    allowed = _section_keys(section)
    out = dict(values)
    for key, value in values.items():
        if key not in allowed:
            hint = _close_match(key, allowed)
            raise ConfigError(f"{path}.{key}", "unknown key", f"did you mean {hint!r}?" if hint else None)
        if section == "training":
            if key in RESERVED_TRAINING_KEYS:
                raise ConfigError(f"{path}.{key}", "set by ftflow", RESERVED_TRAINING_KEYS[key])
            ok, converted = libfields.coerce_value(allowed[key].annotation, value)
            if not ok:
                raise ConfigError(
                    f"{path}.{key}",
                    f"expected {allowed[key].annotation}, got {value!r}",
                )
            out[key] = converted
        elif section in ("lora", "adalora"):
            ok, converted = libfields.coerce_value(allowed[key].annotation, value)
            if not ok:
                raise ConfigError(f"{path}.{key}", f"expected {allowed[key].annotation}, got {value!r}")
            out[key] = converted
    return out


def _check_training(path: str, training: dict) -> None:
    optim = training.get("optim")
    if optim is not None and optim not in libfields.optimizer_names():
        hint = _close_match(optim, libfields.optimizer_names())
        raise ConfigError(f"{path}.optim", f"unknown optimizer {optim!r}", f"did you mean {hint!r}?" if hint else None)
    sched = training.get("lr_scheduler_type")
    if sched is not None and sched not in libfields.scheduler_names():
        hint = _close_match(sched, libfields.scheduler_names())
        raise ConfigError(
            f"{path}.lr_scheduler_type", f"unknown scheduler {sched!r}", f"did you mean {hint!r}?" if hint else None
        )
    for key in ("learning_rate", "num_train_epochs"):
        if key in training and training[key] <= 0:
            raise ConfigError(f"{path}.{key}", f"must be > 0, got {training[key]}")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size"):
        if key in training and training[key] < 1:
            raise ConfigError(f"{path}.{key}", f"must be >= 1, got {training[key]}")
    if training.get("max_steps", -1) == 0:
        raise ConfigError(f"{path}.max_steps", "must be > 0 (or -1 to train by epochs)")


# --------------------------------------------------------------------------- methods


def _check_best_model(path: str, training: dict) -> None:
    """load_best_model_at_end needs checkpoints where evaluations are (TrainingArguments' rule), checked before any job."""
    if not training.get("load_best_model_at_end"):
        return
    evaluate, save = training.get("eval_strategy", "no"), training.get("save_strategy", "steps")
    if evaluate == "no":
        raise ConfigError(f"{path}.load_best_model_at_end", "needs evaluations during training to pick the best checkpoint", "set eval_strategy: steps (or epoch)")
    if evaluate != save:
        raise ConfigError(f"{path}.save_strategy", f"{save!r} differs from eval_strategy {evaluate!r}; load_best_model_at_end needs a checkpoint at each evaluation")
    every = training.get("eval_steps") or training.get("logging_steps", 1)
    if save == "steps" and training["save_steps"] % every:
        raise ConfigError(f"{path}.save_steps", f"{training['save_steps']} is not a multiple of eval_steps {every}; load_best_model_at_end needs a checkpoint at each evaluation")


def _check_adalora_schedule(path: str, stage: StageSpec, dataset: DatasetSpec, workdir: str) -> None:
    """Reject, before any job, a schedule with no budgeting phase whenever the step count is known now."""
    training = stage.training
    rows = None if training.get("max_steps", -1) > 0 else _known_train_rows(dataset, workdir)
    if training.get("max_steps", -1) <= 0 and rows is None:
        return  # counted exactly at train time (train.py checks again)
    batch, accumulation = training["per_device_train_batch_size"], training.get("gradient_accumulation_steps", 1)
    epochs = training.get("num_train_epochs", 1.0)
    total = optimizer_steps(rows or 0, batch, accumulation, epochs, training.get("max_steps", -1), drop_last=bool(training.get("dataloader_drop_last")))
    problem = adalora_schedule_problem(stage.adalora, total)
    if problem:
        how = (
            f"training.max_steps {training['max_steps']}"
            if training.get("max_steps", -1) > 0
            else f"at most {rows} training rows of dataset {dataset.name!r} / batch {batch} / accumulation {accumulation} x {epochs:g} epochs"
        )
        raise ConfigError(f"{path}.adalora", f"{problem}; total_step {total} comes from {how}")


def _known_train_rows(dataset: DatasetSpec, workdir: str) -> int | None:
    """Training rows of a dataset when they can be counted without reading it: a generator's
    `train` argument, or the lines of local .jsonl files less the held-out splits. An upper
    bound (tokenization may drop rows), so a schedule it rejects fails for real. Text datasets
    become blocks of tokens and are only counted at train time."""
    import inspect

    from .errors import FtflowError
    from .sources import cut_splits, local_files

    if dataset.kind == "text":
        return None
    source = dataset.source
    own_splits = set(source) if isinstance(source, dict) else set()
    if isinstance(source, str) and source.startswith("generator:"):
        from .generators import GENERATORS

        generate = GENERATORS[source.partition(":")[2]]
        default = inspect.signature(generate).parameters.get("train")
        rows = dataset.args.get("train", default.default if default is not None else None)
        return rows if isinstance(rows, int) else None
    pattern = source.get("train") if isinstance(source, dict) else source
    if not isinstance(pattern, str) or pattern.partition(":")[0] in ("hub", "modelscope"):
        return None  # counted only once downloaded
    files = local_files(pattern, workdir)
    if not files or not all(f.endswith(".jsonl") for f in files):
        return None
    lines = 0
    for file in files:
        with open(file, "rb") as handle:
            lines += sum(1 for line in handle if line.strip())
    if own_splits >= {"validation", "test"}:
        return lines
    splits = {"train": list(range(lines)), **{split: [] for split in own_splits - {"train"}}}
    try:
        return len(cut_splits(splits, dataset.splits, dataset.name)[0]["train"])
    except FtflowError:  # tokenization reports an unusable split setting with its own message
        return None


def _check_adapter_continuation(path: str, stage: StageSpec, previous: StageSpec) -> None:
    """`init_from: adapter` goes on training the previous stage's adapter, whose shape is fixed."""
    where = f"{path}.init_from"
    if previous.method == "full":
        raise ConfigError(where, f"stage {previous.name!r} trains full weights and has no adapter to continue", "use 'merged'")
    if stage.method == "full":
        raise ConfigError(where, "a full fine-tuning stage has no adapter to continue one into", "use 'merged'")
    family = {"lora": "lora", "qlora": "lora", "adalora": "adalora"}
    if family[stage.method] != family[previous.method]:
        raise ConfigError(where, f"cannot continue a {previous.method} adapter (stage {previous.name!r}) as {stage.method}", f"use method {previous.method} or init_from: merged")
    # The continued adapter keeps its saved settings; a different value here would be ignored.
    section = "lora" if family[stage.method] == "lora" else "adalora"
    schedule_keys = {"target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight"}  # per stage
    mine, theirs = getattr(stage, section), getattr(previous, section)
    for key in sorted(set(mine) | set(theirs)):
        if key not in schedule_keys and mine.get(key) != theirs.get(key):
            raise ConfigError(
                f"{path}.{section}.{key}",
                f"{mine.get(key)!r} differs from stage {previous.name!r} ({theirs.get(key)!r}), whose adapter this stage continues with its saved settings",
                "set the same value, or init_from: merged to start a new adapter",
            )


# --------------------------------------------------------------------------- models & datasets


def _resolve_model(name: str, raw: Any) -> ModelSpec:
    path = f"models.{name}"
    check_name(path, name, "model")
    check_keys(path, raw, ModelSpec.__dataclass_fields__.keys() - {"name"})
    sources = [k for k in ("hub", "path", "package") if raw.get(k)]
    if len(sources) != 1:
        raise ConfigError(path, "set exactly one of 'hub', 'path' or 'package'", f"found {sources or 'none'}")
    if raw.get("package") and not raw.get("file"):
        raise ConfigError(f"{path}.file", "a model from a package needs the GGUF file name")
    return ModelSpec(name=name, **raw)


def _resolve_dataset(name: str, raw: Any) -> DatasetSpec:
    path = f"datasets.{name}"
    check_name(path, name, "dataset")
    check_keys(path, raw, DatasetSpec.__dataclass_fields__.keys() - {"name"})
    if "source" not in raw:
        raise ConfigError(f"{path}.source", "missing", "a path or glob, 'hub:<id>', 'modelscope:<id>' or 'generator:<name>'")
    values = dict(raw)
    kind = values.get("kind", "chat")
    if kind not in KINDS:
        raise ConfigError(f"{path}.kind", f"unknown kind {kind!r}", f"one of {', '.join(KINDS)}")
    if kind == "instruction" and not (values.get("template") or (values.get("prompt") and values.get("completion"))):
        raise ConfigError(f"{path}.template", "an instruction dataset needs 'template' (or 'prompt' and 'completion')")
    metrics = values.get("metrics") or ()
    for metric in metrics:
        if metric not in METRICS:
            raise ConfigError(f"{path}.metrics", f"unknown metric {metric!r}", f"one of {', '.join(METRICS)}")
    values["metrics"] = tuple(metrics)
    if values.get("primary_metric") and values["primary_metric"] not in primary_metric_choices(metrics):
        raise ConfigError(
            f"{path}.primary_metric",
            f"{values['primary_metric']!r} is not a number this dataset's metrics report",
            f"one of {', '.join(primary_metric_choices(metrics))}",
        )
    if values.get("truncation", "drop") not in ("drop", "truncate"):
        raise ConfigError(f"{path}.truncation", f"unknown value {values['truncation']!r}", "drop or truncate")
    loss_on = values.get("loss_on")
    allowed_loss = {"text": ("all",), "instruction": ("completion", "all"), "chat": ("assistant", "all")}[kind]
    if loss_on is not None and loss_on not in allowed_loss:
        raise ConfigError(f"{path}.loss_on", f"{loss_on!r} does not apply to a {kind} dataset", f"one of {', '.join(allowed_loss)}")
    _check_dataset_settings(path, values, kind)
    return DatasetSpec(name=name, **values)


# Dataset keys that only one kind, or one kind of source, reads.
KIND_ONLY_KEYS = {"template": "instruction", "prompt": "instruction", "completion": "instruction", "text_column": "text", "messages_column": "chat", "chat_template": "chat"}
SOURCE_ONLY_KEYS = {"subset": ("hub", "modelscope"), "revision": ("hub", "modelscope"), "hub_splits": ("hub", "modelscope"), "args": ("generator",)}


def _check_dataset_settings(path: str, values: dict, kind: str) -> None:
    """Template syntax, split settings and keys that fit the kind and the source, before any job."""
    from .encoding import template_columns
    from .sources import SPLITS, check_split_settings

    for key, only in KIND_ONLY_KEYS.items():
        if values.get(key) is not None and kind != only:
            raise ConfigError(f"{path}.{key}", f"applies to {only} datasets; this one is {kind}", "remove it or set kind")
    # Source-only keys (SOURCE_ONLY_KEYS) another source does not read are left alone, so that a
    # second config file can point a hub dataset at local files; they stay out of data_id.
    source = values["source"]
    if kind == "instruction":
        if values.get("template") is not None and (values.get("prompt") is not None or values.get("completion") is not None):
            raise ConfigError(f"{path}.template", "set either 'template' or 'prompt' and 'completion', not both")
        for key in ("template", "prompt", "completion"):
            if values.get(key) is not None:
                try:
                    columns = template_columns(values[key])
                except ValueError as err:
                    raise ConfigError(f"{path}.{key}", f"invalid template: {err}") from None
                if key == "template" and not columns:
                    raise ConfigError(f"{path}.template", "the template has no {column} placeholder", "the completion is the text from the last placeholder on")
    try:
        values["splits"] = check_split_settings(values.get("splits"))
    except ValueError as err:
        raise ConfigError(f"{path}.splits", str(err)) from None
    if isinstance(source, dict):
        for split in source:
            if split not in SPLITS:
                raise ConfigError(f"{path}.source.{split}", "unknown split", "train, validation or test")
        if "train" not in source:
            raise ConfigError(f"{path}.source", "the mapping has no 'train' split")
        for split in ("validation", "test"):
            if split in source and split in (values["splits"] or {}):
                raise ConfigError(f"{path}.splits.{split}", f"the source gives its own {split} split", f"remove splits.{split}")
    hub_splits = values.get("hub_splits")
    if hub_splits is not None:
        if not isinstance(hub_splits, dict) or not all(isinstance(v, str) for v in hub_splits.values()):
            raise ConfigError(f"{path}.hub_splits", "expected a mapping of ftflow split to the source's split name, e.g. {train: train, test: test}")
        for split in hub_splits:
            if split not in SPLITS:
                raise ConfigError(f"{path}.hub_splits.{split}", "unknown split", "train, validation or test")
        if "train" not in hub_splits:
            raise ConfigError(f"{path}.hub_splits", "names no 'train' split", "e.g. {train: train}")
        for split in ("validation", "test"):
            if split in hub_splits and split in (values["splits"] or {}):
                raise ConfigError(f"{path}.splits.{split}", f"hub_splits already names a {split} split", f"remove splits.{split}")


def _source_fingerprint(dataset: DatasetSpec, path: str, workdir: str, hashes: "FileHashCache") -> str:
    """Content hash of the rows a source gives; for local files also checks, cheaply, that they fit the dataset."""
    source = dataset.source
    if isinstance(source, dict):
        parts = {}
        for split, pattern in source.items():
            parts[split] = _files_fingerprint(dataset, pattern, f"{path}.source.{split}", workdir, hashes)
        return content_hash(parts)
    if not isinstance(source, str):
        raise ConfigError(f"{path}.source", "expected a string or a mapping of split to path")
    scheme, _, rest = source.partition(":")
    if scheme in ("hub", "modelscope") and rest:
        # a hub dataset is named, not hashed: pin `revision` to make its rows fixed
        return content_hash({"source": source, "subset": dataset.subset, "revision": dataset.revision, "hub_splits": dataset.hub_splits})
    if scheme == "generator" and rest:
        import inspect

        from .generators import GENERATORS

        if rest not in GENERATORS:
            raise ConfigError(f"{path}.source", f"unknown generator {rest!r}", f"one of {', '.join(GENERATORS)}")
        try:
            inspect.signature(GENERATORS[rest]).bind(**dataset.args)
        except TypeError as err:
            raise ConfigError(f"{path}.args", f"generator {rest!r}: {err}") from None
        # the generator's code is part of its rows: editing it re-tokenizes
        with open(inspect.getsourcefile(GENERATORS[rest]), "rb") as handle:
            code = hashlib.sha256(handle.read()).hexdigest()
        return content_hash({"generator": rest, "args": dataset.args, "code": code})
    return _files_fingerprint(dataset, source, f"{path}.source", workdir, hashes)


def _files_fingerprint(dataset: DatasetSpec, pattern: str, path: str, workdir: str, hashes: "FileHashCache") -> str:
    from .sources import LOCAL_EXTENSIONS, local_files

    files = local_files(pattern, workdir)
    if not files:
        raise ConfigError(path, f"no file matches {pattern!r}", f"paths are relative to {workdir}")
    for file in files:
        if os.path.splitext(file)[1].lower() not in LOCAL_EXTENSIONS:
            raise ConfigError(path, f"unsupported file type: {os.path.relpath(file, workdir)}", f"use {', '.join(LOCAL_EXTENSIONS)}")
    _check_local_columns(dataset, path, files, workdir)
    # The format (extension) decides how bytes become rows; the file names do not.
    return content_hash([[os.path.splitext(f)[1].lower(), hashes.get(f)] for f in files])


def tokenization_settings(dataset: DatasetSpec, workdir: str) -> dict:
    """The dataset settings that change its tokens, normalized: the kind's encoding keys
    (data.ENCODING_KEYS; a template split into prompt and completion, loss_on filled in,
    a chat template file read), the source and its options, and the split settings.
    Metrics, primary_metric and keys the kind does not read never reach data_id."""
    from .encoding import DEFAULT_LOSS_ON, ENCODING_KEYS, TOKENIZATION_VERSION, split_template

    values = asdict(dataset)
    if dataset.kind == "instruction" and dataset.template:
        values["prompt"], values["completion"] = split_template(dataset.template)
    values["loss_on"] = dataset.loss_on or DEFAULT_LOSS_ON[dataset.kind]
    values["chat_template"] = _template_text(dataset.chat_template, workdir, f"datasets.{dataset.name}.chat_template")
    source = dataset.source
    scheme = source.partition(":")[0] if isinstance(source, str) and ":" in source else "local"
    options = {key: values[key] for key, schemes in SOURCE_ONLY_KEYS.items() if scheme in schemes}
    return {
        "kind": dataset.kind,
        "source": source,
        "source_options": options,
        "encoding": {key: values[key] for key in ENCODING_KEYS[dataset.kind]},
        "splits": dataset.splits,
        "version": TOKENIZATION_VERSION,
    }


def _template_text(template: str | None, workdir: str, path: str) -> str | None:
    """A chat template's text: given inline (it has Jinja braces) or as a file, read here so
    that editing the file changes data_id and re-tokenizes."""
    if not template or "{" in template:
        return template
    file = template if os.path.isabs(template) else os.path.join(workdir, template)
    if not os.path.isfile(file):
        raise ConfigError(path, f"no chat template file {template!r} (and no Jinja braces to be a template itself)", f"paths are relative to {workdir}")
    with open(file, encoding="utf-8") as handle:
        return handle.read()


PEEK_FILES = 3  # files of a glob whose first rows are checked at config time


def _check_local_columns(dataset: DatasetSpec, path: str, files: list[str], workdir: str) -> None:
    """A column the dataset needs that none of a file's first rows has is a config error, before any job."""
    from .encoding import template_columns
    from .sources import peek_columns

    dataset_path = path.split(".source")[0]
    if dataset.kind == "instruction":
        templates = [("template", dataset.template)] if dataset.template else [("prompt", dataset.prompt), ("completion", dataset.completion)]
        needed = [(f"{dataset_path}.{key}", column) for key, text in templates for column in template_columns(text)]
    elif dataset.kind == "chat":
        needed = [(f"{dataset_path}.messages_column", dataset.messages_column)]
    else:
        needed = [(f"{dataset_path}.text_column", dataset.text_column)]
    for file in files[:PEEK_FILES]:
        peeked = peek_columns(file)
        if peeked is None or not peeked[0]:
            continue  # unreadable or too large to peek at: tokenization reports it per row
        rows, unit = peeked
        present = set().union(*rows)
        for key, column in needed:
            if column not in present:
                hint = _close_match(column, sorted(present))
                where = os.path.relpath(file, workdir)
                scope = f"the first {len(rows)} {unit}s of {where}" if len(rows) > 1 else f"{where} ({unit} 1)"
                raise ConfigError(
                    key,
                    f"column {column!r} is in none of {scope}; its columns are {', '.join(sorted(present)) or 'none'}",
                    f"did you mean {hint!r}?" if hint else None,
                )


class FileHashCache:
    """sha256 of data files, remembered by (path, size, mtime) across runs."""

    def __init__(self, store: str | None):
        self.store = store
        self.entries: dict[str, list] = {}
        self.dirty = False
        if store and os.path.exists(store):
            try:
                with open(store, encoding="utf-8") as handle:
                    self.entries = json.load(handle)
            except (OSError, ValueError):
                self.entries = {}

    def get(self, path: str) -> str:
        stat = os.stat(path)
        key = os.path.abspath(path)
        entry = self.entries.get(key)
        if entry and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns:
            return entry[2]
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        value = digest.hexdigest()
        self.entries[key] = [stat.st_size, stat.st_mtime_ns, value]
        self.dirty = True
        return value

    def save(self) -> None:
        if self.store and self.dirty:
            write_if_changed(self.store, self.entries)


# --------------------------------------------------------------------------- experiments


def _raw_stages(name: str, exp: dict) -> list[tuple[str, dict]]:
    """[(config path, stage dict)], for the list form or the single inline stage."""
    if "stages" in exp:
        stages = exp["stages"]
        if not isinstance(stages, list) or not stages:
            raise ConfigError(f"experiments.{name}.stages", "expected a non-empty list of stages")
        return [(f"experiments.{name}.stages[{i}]", s if s is not None else {}) for i, s in enumerate(stages)]
    return [(f"experiments.{name}", {})]


def _resolve_stage(
    exp_name: str,
    path: str,
    index: int,
    merged: dict,
    datasets: dict[str, DatasetSpec],
    smoke: dict | None,
) -> tuple[StageSpec, DatasetSpec]:
    method = merged.get("method", "lora")
    if method not in METHODS:
        raise ConfigError(f"{path}.method", f"unknown method {method!r}", f"one of {', '.join(METHODS)}")
    dataset_name = merged.get("dataset")
    if dataset_name is None:
        raise ConfigError(f"{path}.dataset", "no dataset set for this stage", "set 'dataset' here or in defaults")
    if dataset_name not in datasets:
        raise ConfigError(f"{path}.dataset", f"unknown dataset {dataset_name!r}", f"defined: {', '.join(datasets) or 'none'}")
    dataset = datasets[dataset_name]
    init_from = merged.get("init_from", "merged")
    if init_from not in ("merged", "adapter"):
        raise ConfigError(f"{path}.init_from", f"unknown value {init_from!r}", "merged or adapter")
    training = deep_merge(TRAINING_DEFAULTS, _check_section(f"{path}.training", "training", merged.get("training") or {}))
    _check_training(f"{path}.training", training)
    lora = deep_merge(LORA_DEFAULTS, _check_section(f"{path}.lora", "lora", merged.get("lora") or {}))
    adalora = deep_merge(ADALORA_DEFAULTS, _check_section(f"{path}.adalora", "adalora", merged.get("adalora") or {}))
    quant = deep_merge(QUANTIZATION_DEFAULTS, _check_section(f"{path}.quantization", "quantization", merged.get("quantization") or {}))
    divergence = deep_merge(DIVERGENCE_DEFAULTS, _check_section(f"{path}.divergence", "divergence", merged.get("divergence") or {}))
    max_length = merged.get("max_length") or dataset.max_length
    if smoke:
        training["max_steps"] = min(training.get("max_steps", -1) if training.get("max_steps", -1) > 0 else 10**9, smoke["max_steps"])
        training["save_steps"] = max(1, min(training.get("save_steps", 50), smoke["max_steps"]))
        if training.get("eval_strategy") == "steps":
            training["eval_steps"] = training["save_steps"]  # evaluate at every (capped) checkpoint
        for key in ("warmup_steps",):
            if isinstance(training.get(key), (int, float)) and training[key] >= 1:
                training[key] = 0
        max_length = min(max_length, smoke["max_length"])
    if method == "adalora" and adalora["target_r"] > adalora["init_r"]:
        raise ConfigError(f"{path}.adalora.target_r", f"target_r ({adalora['target_r']}) must be <= init_r ({adalora['init_r']})")
    _check_best_model(f"{path}.training", training)
    if method == "adalora":
        if "total_step" in (merged.get("adalora") or {}):
            raise ConfigError(f"{path}.adalora.total_step", "ftflow computes it from the data size, batch, accumulation and epochs (or max_steps)", "remove it")
        if smoke:
            adalora.update(smoke_adalora_schedule(training["max_steps"]))
    if method == "qlora" and "gradient_checkpointing" not in training:
        # The QLoRA recipe: with 4-bit weights, activations dominate memory.
        # (`gradient_checkpointing` is transformers 5's deprecated alias of this key.)
        training.setdefault("activation_checkpointing", True)
    if method in ("lora", "qlora") and lora["r"] < 1:
        raise ConfigError(f"{path}.lora.r", f"must be >= 1, got {lora['r']}")
    if index == 0 and init_from == "adapter":
        raise ConfigError(f"{path}.init_from", "the first stage has no previous adapter to continue", "use 'merged' (the default)")
    _check_data_parallel(f"{path}.gpus", merged.get("gpus"), training)
    name = merged.get("name") or ("train" if merged.get("_single") else f"stage{index + 1}")
    check_name(f"{path}.name", name, "stage")
    if name in ("eval", "config.json"):
        raise ConfigError(f"{path}.name", f"stage name {name!r} is reserved")
    # Sections a method does not read are left empty, so that editing them
    # changes no other method's resolved config (and re-runs nothing else).
    stage = StageSpec(
        name=name,
        index=index,
        method=method,
        dataset=dataset_name,
        data_id="",  # filled by the caller, which knows the model
        init_from=init_from,
        max_length=int(max_length),
        packing=bool(merged.get("packing", True)),
        lora=lora if method in ("lora", "qlora") else {},
        adalora=adalora if method == "adalora" else {},
        quantization=quant if method == "qlora" else {},
        training=training,
        divergence=divergence,
        gpus=merged.get("gpus"),
    )
    return stage, dataset


def _check_data_parallel(path: str, gpus: int | None, training: dict) -> None:
    """A stage on k > 1 GPUs must split its effective batch evenly over them (launch.py)."""

    if not gpus or gpus <= 1:
        return
    try:
        per_process_batch(int(training["per_device_train_batch_size"]), int(training.get("gradient_accumulation_steps", 1)), gpus)
    except BatchSplitError as err:
        raise ConfigError(path, str(err), "the effective batch stays what the config says on any number of GPUs") from None


def normalize_raw(raw: dict | None) -> dict:
    """A deep copy with command-line strings read as YAML (`--config smoke=true` passes 'true')."""
    raw = copy.deepcopy(raw or {})
    if isinstance(raw.get("smoke"), str):
        raw["smoke"] = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(
            raw["smoke"].strip().lower(), raw["smoke"]
        )
    return raw


def build_plan(raw: dict, workdir: str = ".", results: str = "results", check_schema: bool = True) -> Plan:
    """Validate and resolve a raw config into a Plan. Raises ConfigError on the first problem."""
    raw = normalize_raw(raw)
    if check_schema:
        schema_errors(raw)
    smoke_on = bool(raw.get("smoke", False))
    smoke = deep_merge(SMOKE_DEFAULTS, raw.get("smoke_options") or {}) if smoke_on else None

    models = {name: _resolve_model(name, spec or {}) for name, spec in (raw.get("models") or {}).items()}
    datasets = {name: _resolve_dataset(name, spec or {}) for name, spec in (raw.get("datasets") or {}).items()}
    defaults = raw.get("defaults") or {}
    check_keys("defaults", defaults, DEFAULT_KEYS)

    hashes = FileHashCache(os.path.join(results, "data", ".file-hashes.json"))
    fingerprints: dict[str, str] = {}

    def fingerprint(dataset: DatasetSpec) -> str:
        if dataset.name not in fingerprints:
            fingerprints[dataset.name] = _source_fingerprint(dataset, f"datasets.{dataset.name}", workdir, hashes)
        return fingerprints[dataset.name]

    data: dict[str, DataSpec] = {}

    def data_id_for(dataset: DatasetSpec, model: str, max_length: int) -> str:
        caps = None
        if smoke:
            caps = {"train": smoke["train_rows"], "validation": smoke["eval_rows"], "test": smoke["eval_rows"]}
        model_spec = models[model]
        tokenizer_source = "smoke-tokenizer" if smoke else model_spec.source_text()
        settings = {
            **tokenization_settings(dataset, workdir),
            "fingerprint": fingerprint(dataset),
            "max_length": max_length,
            "row_caps": caps,
            "tokenizer": tokenizer_source,
            # only chat rows are rendered with the model's chat template
            "model_chat_template": _template_text(model_spec.chat_template, workdir, f"models.{model}.chat_template") if dataset.kind == "chat" else None,
        }
        # The name prefix keeps results/data/ readable; the hash covers exactly the settings.
        data_id = f"{dataset.name}-{content_hash(settings, 12)}"
        if data_id not in data:
            data[data_id] = DataSpec(
                data_id=data_id,
                dataset=dataset,
                model=model,
                tokenizer_source=tokenizer_source,
                max_length=max_length,
                row_caps=caps,
                fingerprint=fingerprint(dataset),
                settings=settings,
            )
        return data_id

    experiments: dict[str, ExperimentSpec] = {}
    for name, exp in expand_sweeps(raw).items():
        path = f"experiments.{name}"
        sweep = exp.pop("_sweep", None)
        if sweep:
            path = f"sweeps.{sweep['name']} (experiment {name})"
        check_keys(path, exp, EXPERIMENT_KEYS)
        model = exp.get("model", defaults.get("model"))
        if model is None:
            raise ConfigError(f"{path}.model", "no model set", "set 'model' here or in defaults")
        if model not in models:
            raise ConfigError(f"{path}.model", f"unknown model {model!r}", f"defined: {', '.join(models) or 'none'}")
        baseline = bool(exp.get("baseline", False))
        shared = {k: v for k, v in exp.items() if k in STAGE_KEYS}
        stages: list[StageSpec] = []
        if not baseline:
            raw_stages = _raw_stages(name, exp)
            for index, (stage_path, stage_raw) in enumerate(raw_stages):
                check_keys(stage_path, stage_raw, STAGE_KEYS)
                merged = {k: v for k, v in defaults.items() if k in STAGE_KEYS}
                for layer in (shared, stage_raw):
                    for key, value in layer.items():
                        if key in DICT_SECTIONS and isinstance(value, dict) and isinstance(merged.get(key), dict):
                            merged[key] = deep_merge(merged[key], value)
                        else:
                            merged[key] = copy.deepcopy(value)
                if "stages" not in exp:
                    merged["_single"] = True
                stage, dataset = _resolve_stage(name, stage_path, index, merged, datasets, smoke)
                stage = StageSpec(**{**asdict(stage), "data_id": data_id_for(dataset, model, stage.max_length)})
                if any(s.name == stage.name for s in stages):
                    raise ConfigError(f"{stage_path}.name", f"duplicate stage name {stage.name!r}")
                if stage.init_from == "adapter":
                    _check_adapter_continuation(stage_path, stage, stages[-1])
                if stage.method == "adalora":
                    _check_adalora_schedule(stage_path, stage, datasets[stage.dataset], workdir)
                stages.append(stage)
        elif "stages" in exp:
            raise ConfigError(f"{path}.stages", "a baseline experiment evaluates the untuned model and has no stages")
        eval_raw = deep_merge(defaults.get("eval") or {}, exp.get("eval") or {})
        eval_spec = _resolve_eval(f"{path}.eval", eval_raw, stages, datasets, smoke, data_id_for, model, defaults)
        experiments[name] = ExperimentSpec(
            name=name,
            model=model,
            stages=tuple(stages),
            eval=eval_spec,
            baseline=baseline,
            description=str(exp.get("description", "")),
            sweep=sweep["name"] if sweep else None,
            sweep_params=sweep["params"] if sweep else {},
            smoke=smoke_on,
        )
    if not experiments:
        raise ConfigError("experiments", "no experiments defined")
    _add_baselines(raw, experiments, models, datasets, smoke, data_id_for, defaults)
    hashes.save()
    return Plan(models=models, datasets=datasets, experiments=experiments, data=data, smoke=smoke_on, results=results)


def _resolve_eval(path, eval_raw, stages, datasets, smoke, data_id_for, model, defaults) -> EvalSpec:
    values = deep_merge(EVAL_DEFAULTS, _check_section(path, "eval", eval_raw))
    dataset_name = values["dataset"] or (stages[-1].dataset if stages else defaults.get("dataset"))
    if dataset_name is None:
        raise ConfigError(f"{path}.dataset", "no dataset to evaluate on", "set eval.dataset")
    if dataset_name not in datasets:
        raise ConfigError(f"{path}.dataset", f"unknown dataset {dataset_name!r}")
    dataset = datasets[dataset_name]
    metrics = tuple(values["metrics"] if values["metrics"] is not None else dataset.metrics)
    for metric in metrics:
        if metric not in METRICS:
            raise ConfigError(f"{path}.metrics", f"unknown metric {metric!r}", f"one of {', '.join(METRICS)}")
    if metrics and dataset.kind == "text":
        raise ConfigError(
            f"{path}.metrics",
            f"dataset {dataset_name!r} is raw text: it has no prompts to generate answers from",
            "score it by eval_loss/perplexity (metrics: []), or evaluate on a chat or instruction dataset",
        )
    primary = values["primary_metric"] or dataset.primary_metric or (METRIC_OUTPUTS[metrics[0]][0] if metrics else "eval_loss")
    if primary not in primary_metric_choices(metrics):
        raise ConfigError(
            f"{path}.primary_metric",
            f"{primary!r} is not a number the evaluation reports",
            f"one of {', '.join(primary_metric_choices(metrics))}",
        )
    # Every experiment is scored on the same tokens: the dataset's own max_length,
    # whatever a stage trained with, so rows of a sweep over max_length stay comparable.
    max_length = dataset.max_length
    if smoke:
        max_length = min(max_length, smoke["max_length"])
    for key in ("max_new_tokens", "batch_size"):
        if not isinstance(values[key], int) or values[key] < 1:
            raise ConfigError(f"{path}.{key}", f"must be a positive integer, got {values[key]!r}")
    return EvalSpec(
        dataset=dataset_name,
        data_id=data_id_for(dataset, model, max_length),
        split=values["split"],
        loss_split=values["loss_split"],
        max_new_tokens=min(values["max_new_tokens"], smoke["max_new_tokens"]) if smoke else values["max_new_tokens"],
        batch_size=values["batch_size"],
        do_sample=bool(values["do_sample"]),
        temperature=float(values["temperature"]),
        top_p=float(values["top_p"]),
        max_examples=values["max_examples"],
        metrics=metrics,
        primary_metric=primary,
    )


def _add_baselines(raw, experiments, models, datasets, smoke, data_id_for, defaults) -> None:
    """Add one untuned-model experiment per (model, eval dataset) unless the config has them."""
    report = raw.get("report") or {}
    if not report.get("baseline", True):
        return
    have = {(e.model, e.eval.data_id) for e in experiments.values() if e.baseline}
    wanted = []
    for exp in list(experiments.values()):
        key = (exp.model, exp.eval.data_id)
        if not exp.baseline and key not in have and key not in [w[0] for w in wanted]:
            wanted.append((key, exp))
    for (model, _), exp in wanted:
        name = "baseline" if len(wanted) == 1 else f"baseline-{model}-{exp.eval.dataset}"
        if name in experiments:
            raise ConfigError(f"experiments.{name}", "this name is reserved for the automatic baseline", "rename the experiment or set report.baseline: false")
        experiments[name] = ExperimentSpec(
            name=name,
            model=model,
            stages=(),
            eval=exp.eval,
            baseline=True,
            description="untuned base model",
            smoke=exp.smoke,
        )


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
    """Raise a ConfigError for a key that appears twice in one mapping of a YAML file.

    Two experiments with the same name would otherwise be one experiment, the
    last one, without a word.
    """
    with open(path, encoding="utf-8") as handle:
        loader = _DuplicateKeyLoader(handle)
        loader.duplicates = []
        try:
            loader.get_single_data()
        except yaml.YAMLError:
            return  # Snakemake reports syntax errors itself
        finally:
            loader.dispose()
    if loader.duplicates:
        key, first, second = loader.duplicates[0]
        raise ConfigError(
            f"{path}:{second}",
            f"key {key!r} is given twice (lines {first} and {second}); YAML would keep only the last",
            "rename one of them",
        )


def load_workflow_config(configfiles: list[str], overrides: dict | None = None) -> dict:
    """Merge config files in order, then command-line overrides (as Snakemake does)."""
    merged: dict = {}
    for path in configfiles:
        merged = deep_merge(merged, load_yaml(path))
    if overrides:
        merged = deep_merge(merged, overrides)
    return merged
