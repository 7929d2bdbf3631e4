"""Which settings a run has, and what the table's columns call them.

The table shows only the settings that differ between experiments; to find
those, every experiment's settings are flattened to dotted keys
(`training.learning_rate`, `lora.r`). A stage contributes only the config
sections its method reads (ftflow.methods.METHODS), so a LoRA run's unused
`adalora` section neither makes a column nor shows in its headline.
"""

from __future__ import annotations

from ..methods import METHODS
from ..specs import ExperimentSpec, StageSpec

# Short column names, in column order, for the settings sweeps vary most; other keys show their last part.
SHORT_NAMES = {
    "training.learning_rate": "lr",
    "training.per_device_train_batch_size": "batch",
    "training.gradient_accumulation_steps": "accum",
    "training.num_train_epochs": "epochs",
    "training.warmup_steps": "warmup",
    "training.lr_scheduler_type": "scheduler",
    "lora.r": "r",
    "lora.lora_alpha": "alpha",
    "lora.lora_dropout": "dropout",
    "lora.target_modules": "targets",
    "max_length": "max_len",
    "training.gradient_checkpointing": "grad_ckpt",
}
EVAL_SETTINGS = ("dataset", "split", "max_new_tokens", "do_sample", "temperature", "top_p", "max_examples")


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, sub, out)
    else:
        out[prefix] = value


def stage_settings(stage: StageSpec) -> dict:
    """The settings of one stage that matter for its method, flattened to dotted keys; a mixture's
    datasets are joined with ' + ' and its mix settings (`mix.weights.<dataset>`) are keys of their own."""
    out: dict = {
        "method": stage.method,
        "dataset": " + ".join(stage.datasets),
        "max_length": stage.max_length,
        "packing": stage.packing,
        "init_from": stage.init_from,
    }
    _flatten("mix", stage.mix, out)
    _flatten("training", stage.training, out)
    for section in METHODS[stage.method].sections:
        _flatten(section, getattr(stage, section), out)
    return out


def experiment_settings(spec: ExperimentSpec) -> dict:
    """Every setting of an experiment; a multi-stage experiment's keys start with `stage/`."""
    out: dict = {"model": spec.model}
    for stage in spec.stages:
        prefix = "" if len(spec.stages) == 1 else f"{stage.name}/"
        for key, value in stage_settings(stage).items():
            out[prefix + key] = value
    for key in EVAL_SETTINGS:
        out[f"eval.{key}"] = getattr(spec.eval, key)
    return out


def short_names(keys: list[str], taken: set[str]) -> dict[str, str]:
    """{full key: column label}; a label two keys would share, or one a fixed column has, falls back to the full key."""
    labels = {}
    for key in keys:
        stage, _, dotted = key.rpartition("/")
        label = SHORT_NAMES.get(dotted, dotted.split(".")[-1])
        labels[key] = f"{stage}/{label}" if stage else label
    counts: dict[str, int] = {}
    for label in labels.values():
        counts[label] = counts.get(label, 0) + 1
    return {key: (label if counts[label] == 1 and label not in taken else key) for key, label in labels.items()}


def column_order(key: str) -> tuple:
    """Sort key of a varied setting: by stage, then in SHORT_NAMES order, then the rest by name."""
    stage, _, dotted = key.rpartition("/")
    preferred = list(SHORT_NAMES)
    return (stage, preferred.index(dotted) if dotted in preferred else len(preferred), key)
