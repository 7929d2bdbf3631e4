"""Checks of one stage's mapping sections: training, lora, adalora, quantization, divergence, eval.

`training`, `lora` and `adalora` accept every field of transformers'
TrainingArguments and PEFT's LoraConfig/AdaLoraConfig; their names and types
are read from the libraries' sources (ftflow.fields), since the schema cannot
list them. The other sections' keys come from the schema. What remains here
are the checks a schema cannot express: values that depend on each other.
"""

from __future__ import annotations

from .. import fields as libfields
from ..errors import ConfigError
from ..schedule import BatchSplitError, per_process_batch
from .checks import check_mapping, did_you_mean
from .schema import SECTION_KEYS

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

# Sections whose values are typed by a library class: {section: its fields}.
_LIBRARY_SECTIONS = {
    "training": libfields.training_argument_fields,
    "lora": libfields.lora_fields,
    "adalora": libfields.adalora_fields,
}


def section_keys(section: str):
    """The keys a section accepts (a library section's fields map to their types), or None for a non-section."""
    if section in _LIBRARY_SECTIONS:
        return _LIBRARY_SECTIONS[section]()
    return SECTION_KEYS.get(section)


def check_section(path: str, section: str, values: dict) -> dict:
    """Check keys and simple types of one section; return it with lax YAML values converted ('1e-4' -> 1e-4)."""
    check_mapping(path, values)
    allowed = section_keys(section)
    out = dict(values)
    for key, value in values.items():
        if key not in allowed:
            raise ConfigError(f"{path}.{key}", "unknown key", did_you_mean(key, allowed))
        if section == "training" and key in RESERVED_TRAINING_KEYS:
            raise ConfigError(f"{path}.{key}", "set by ftflow", RESERVED_TRAINING_KEYS[key])
        if section in _LIBRARY_SECTIONS:
            ok, converted = libfields.coerce_value(allowed[key].annotation, value)
            if not ok:
                raise ConfigError(f"{path}.{key}", f"expected {allowed[key].annotation}, got {value!r}")
            out[key] = converted
    return out


def check_training(path: str, training: dict) -> None:
    """Optimizer and scheduler names, and the numbers that must be positive (the schema sees only the file's, not a sweep's)."""
    for key, names, what in (
        ("optim", libfields.optimizer_names, "optimizer"),
        ("lr_scheduler_type", libfields.scheduler_names, "scheduler"),
    ):
        value = training.get(key)
        if value is not None and value not in names():
            raise ConfigError(f"{path}.{key}", f"unknown {what} {value!r}", did_you_mean(value, names()))
    for key in ("learning_rate", "num_train_epochs"):
        if key in training and training[key] <= 0:
            raise ConfigError(f"{path}.{key}", f"must be > 0, got {training[key]}")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size"):
        if key in training and training[key] < 1:
            raise ConfigError(f"{path}.{key}", f"must be >= 1, got {training[key]}")
    if training.get("max_steps", -1) == 0:
        raise ConfigError(f"{path}.max_steps", "must be > 0 (or -1 to train by epochs)")


def check_best_model(path: str, training: dict) -> None:
    """load_best_model_at_end needs checkpoints where evaluations are (TrainingArguments' rule), checked before any job."""
    if not training.get("load_best_model_at_end"):
        return
    evaluate, save = training.get("eval_strategy", "no"), training.get("save_strategy", "steps")
    if evaluate == "no":
        raise ConfigError(
            f"{path}.load_best_model_at_end",
            "needs evaluations during training to pick the best checkpoint",
            "set eval_strategy: steps (or epoch)",
        )
    if evaluate != save:
        raise ConfigError(
            f"{path}.save_strategy",
            f"{save!r} differs from eval_strategy {evaluate!r}; load_best_model_at_end needs a checkpoint at each evaluation",
        )
    every = training.get("eval_steps") or training.get("logging_steps", 1)
    if save == "steps" and training["save_steps"] % every:
        raise ConfigError(
            f"{path}.save_steps",
            f"{training['save_steps']} is not a multiple of eval_steps {every}; load_best_model_at_end needs a checkpoint at each evaluation",
        )


def check_data_parallel(path: str, gpus: int | None, training: dict) -> None:
    """A stage on k > 1 GPUs must split its effective batch evenly over them (the launcher does the split)."""
    if not gpus or gpus <= 1:
        return
    try:
        per_process_batch(
            int(training["per_device_train_batch_size"]), int(training.get("gradient_accumulation_steps", 1)), gpus
        )
    except BatchSplitError as err:
        raise ConfigError(
            path, str(err), "the effective batch stays what the config says on any number of GPUs"
        ) from None


def check_positive_ints(path: str, values: dict, keys) -> None:
    for key in keys:
        if not isinstance(values[key], int) or values[key] < 1:
            raise ConfigError(f"{path}.{key}", f"must be a positive integer, got {values[key]!r}")
