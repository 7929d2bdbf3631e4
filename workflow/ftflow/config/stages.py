"""One training stage resolved: defaults <- experiment <- stage, then checked as a whole.

Values set here may come from a sweep's grid, which the schema never saw, so
the stage's enums (method, init_from) are checked here against the schema's.
"""

from __future__ import annotations

import copy
from typing import Callable

from ..errors import ConfigError
from ..methods import METHODS
from ..schedule import adalora_schedule_problem, optimizer_steps, smoke_adalora_schedule
from ..specs import DatasetSpec, StageSpec
from .checks import check_choice, check_name
from .loading import deep_merge
from .mixtures import planned_train_rows, resolve_datasets
from .schema import (
    ADALORA_DEFAULTS,
    DICT_SECTIONS,
    DIVERGENCE_DEFAULTS,
    INIT_FROM,
    LORA_DEFAULTS,
    METHOD_NAMES,
    QUANTIZATION_DEFAULTS,
    STAGE_DEFAULTS,
    TRAINING_DEFAULTS,
)
from .sections import check_best_model, check_data_parallel, check_section, check_training

# A stage directory sits beside these in results/{experiment}/.
RESERVED_STAGE_NAMES = ("eval", "config.json")
# AdaLoRA's schedule, set stage by stage even when one adapter is continued (lora has none of these keys).
ADALORA_SCHEDULE_KEYS = {"target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight"}
_SECTION_DEFAULTS = {
    "training": TRAINING_DEFAULTS,
    "lora": LORA_DEFAULTS,
    "adalora": ADALORA_DEFAULTS,
    "quantization": QUANTIZATION_DEFAULTS,
    "divergence": DIVERGENCE_DEFAULTS,
}


def raw_stages(path: str, exp: dict) -> list[tuple[str, dict]]:
    """[(config path, stage dict)], for the list form or the single inline stage."""
    if "stages" in exp:
        stages = exp["stages"]
        if not isinstance(stages, list) or not stages:
            raise ConfigError(f"{path}.stages", "expected a non-empty list of stages")
        return [(f"{path}.stages[{i}]", s if s is not None else {}) for i, s in enumerate(stages)]
    return [(path, {})]


def merge_layers(*layers: dict) -> dict:
    """Later layers win; mapping sections merge key by key, so a stage changes one training key, not all.
    `mix` merges one level deep: its weights belong to one list of datasets and are replaced whole."""
    merged: dict = {}
    for layer in layers:
        for key, value in layer.items():
            if key in DICT_SECTIONS and isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = deep_merge(merged[key], value)
            elif key == "mix" and isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **copy.deepcopy(value)}
            else:
                merged[key] = copy.deepcopy(value)
    return merged


def resolve_stage(
    path: str,
    index: int,
    merged: dict,
    default_name: str,
    datasets: dict[str, DatasetSpec],
    smoke: dict | None,
    data_id_of: Callable[[DatasetSpec, int], str],
) -> StageSpec:
    """The stage's spec; `data_id_of(dataset, max_length)` names a member's tokenization (it depends on the model)."""
    values = {**STAGE_DEFAULTS, **merged}
    method = values["method"]
    check_choice(f"{path}.method", method, METHOD_NAMES, "method")
    names, mix = resolve_datasets(path, values.get("dataset"), values["mix"], datasets)
    init_from = values["init_from"]
    check_choice(f"{path}.init_from", init_from, INIT_FROM)
    training = _section(path, "training", merged)
    check_training(f"{path}.training", training)
    sections = {
        section: _section(path, section, merged) for section in ("lora", "adalora", "quantization", "divergence")
    }
    # Each member is tokenized at the stage's max_length, or else at its own, as a one-dataset
    # stage on it would be: the two share the tokenized data.
    lengths = [values["max_length"] or datasets[name].max_length for name in names]
    if smoke:
        _cap_for_smoke(training, smoke)
        lengths = [min(length, smoke["max_length"]) for length in lengths]
    adalora = sections["adalora"]
    if method == "adalora" and adalora["target_r"] > adalora["init_r"]:
        raise ConfigError(
            f"{path}.adalora.target_r", f"target_r ({adalora['target_r']}) must be <= init_r ({adalora['init_r']})"
        )
    check_best_model(f"{path}.training", training)
    if method == "adalora":
        if "total_step" in (merged.get("adalora") or {}):
            raise ConfigError(
                f"{path}.adalora.total_step",
                "ftflow computes it from the data size, batch, accumulation and epochs (or max_steps)",
                "remove it",
            )
        if smoke:
            adalora.update(smoke_adalora_schedule(training["max_steps"]))
    if METHODS[method].quantized and "gradient_checkpointing" not in training:
        # The QLoRA recipe: with 4-bit weights, activations dominate memory.
        # (`gradient_checkpointing` is transformers 5's deprecated alias of this key.)
        training.setdefault("activation_checkpointing", True)
    if "lora" in METHODS[method].sections and sections["lora"]["r"] < 1:
        raise ConfigError(f"{path}.lora.r", f"must be >= 1, got {sections['lora']['r']}")
    if index == 0 and init_from == "adapter":
        raise ConfigError(
            f"{path}.init_from", "the first stage has no previous adapter to continue", "use 'merged' (the default)"
        )
    check_data_parallel(f"{path}.gpus", values["gpus"], training)
    name = values.get("name") or default_name
    check_name(f"{path}.name", name, "stage")
    if name in RESERVED_STAGE_NAMES:
        raise ConfigError(f"{path}.name", f"stage name {name!r} is reserved")
    # Sections a method does not read are left empty, so that editing them
    # changes no other method's resolved config (and re-runs nothing else).
    kept = METHODS[method].sections
    return StageSpec(
        name=name,
        index=index,
        method=method,
        datasets=names,
        data_ids=tuple(data_id_of(datasets[name], length) for name, length in zip(names, lengths)),
        mix=mix,
        init_from=init_from,
        max_length=int(max(lengths)),
        packing=bool(values["packing"]),
        lora=sections["lora"] if "lora" in kept else {},
        adalora=adalora if "adalora" in kept else {},
        quantization=sections["quantization"] if "quantization" in kept else {},
        training=training,
        divergence=sections["divergence"],
        gpus=values["gpus"],
    )


def _section(path: str, section: str, merged: dict) -> dict:
    """A section checked and laid over its schema defaults."""
    return deep_merge(
        _SECTION_DEFAULTS[section], check_section(f"{path}.{section}", section, merged.get(section) or {})
    )


def _cap_for_smoke(training: dict, smoke: dict) -> None:
    """Smoke mode: a few steps, a checkpoint (and evaluation) within them, no warm-up steps beyond them."""
    training["max_steps"] = min(
        training.get("max_steps", -1) if training.get("max_steps", -1) > 0 else 10**9, smoke["max_steps"]
    )
    training["save_steps"] = max(1, min(training.get("save_steps", 50), smoke["max_steps"]))
    if training.get("eval_strategy") == "steps":
        training["eval_steps"] = training["save_steps"]  # evaluate at every (capped) checkpoint
    if isinstance(training.get("warmup_steps"), (int, float)) and training["warmup_steps"] >= 1:
        training["warmup_steps"] = 0


def check_adapter_continuation(path: str, stage: StageSpec, previous: StageSpec) -> None:
    """`init_from: adapter` goes on training the previous stage's adapter, whose shape is fixed."""
    where = f"{path}.init_from"
    mine, theirs = METHODS[stage.method], METHODS[previous.method]
    if not theirs.adapter:
        raise ConfigError(
            where, f"stage {previous.name!r} trains full weights and has no adapter to continue", "use 'merged'"
        )
    if not mine.adapter:
        raise ConfigError(where, "a full fine-tuning stage has no adapter to continue one into", "use 'merged'")
    if mine.peft_section != theirs.peft_section:
        raise ConfigError(
            where,
            f"cannot continue a {previous.method} adapter (stage {previous.name!r}) as {stage.method}",
            f"use method {previous.method} or init_from: merged",
        )
    # The continued adapter keeps its saved settings; a different value here would be ignored.
    section = mine.peft_section
    new, old = getattr(stage, section), getattr(previous, section)
    for key in sorted(set(new) | set(old)):
        if key not in ADALORA_SCHEDULE_KEYS and new.get(key) != old.get(key):
            raise ConfigError(
                f"{path}.{section}.{key}",
                f"{new.get(key)!r} differs from stage {previous.name!r} ({old.get(key)!r}), whose adapter this stage continues with its saved settings",
                "set the same value, or init_from: merged to start a new adapter",
            )


def check_adalora_schedule(path: str, stage: StageSpec, datasets: dict[str, DatasetSpec], workdir: str) -> None:
    """Reject, before any job, a schedule with no budgeting phase whenever the step count is known now."""
    training = stage.training
    max_steps = training.get("max_steps", -1)
    rows = None if max_steps > 0 else planned_train_rows(stage, datasets, workdir)
    if max_steps <= 0 and rows is None:
        return  # counted exactly at train time (train.py checks again)
    batch, accumulation = training["per_device_train_batch_size"], training.get("gradient_accumulation_steps", 1)
    epochs = training.get("num_train_epochs", 1.0)
    total = optimizer_steps(
        rows or 0, batch, accumulation, epochs, max_steps, drop_last=bool(training.get("dataloader_drop_last"))
    )
    problem = adalora_schedule_problem(stage.adalora, total)
    if problem:
        how = (
            f"training.max_steps {max_steps}"
            if max_steps > 0
            else f"at most {rows} training rows of {'mixture' if stage.is_mixture else 'dataset'} {stage.data_text!r} / batch {batch} / accumulation {accumulation} x {epochs:g} epochs"
        )
        raise ConfigError(f"{path}.adalora", f"{problem}; total_step {total} comes from {how}")
