"""train: one stage of one experiment, with the HF Trainer.

    check upstream -> set up device -> set up data -> set up model -> find the resume point
    -> fit -> save the artifact -> write train_metrics.json

Stage folder `results/{experiment}/{stage}/`:
  checkpoints/         Trainer checkpoints while running (removed once the stage ends)
  adapter/ | model/    the result (methods.METHODS[method].artifact), renamed into
                       place; never written for a diverged stage
  tb/                  TensorBoard event files (train/ and eval/ scalars)
  train_metrics.json   written last: steps, tokens, tokens/s, losses, memory, status

A stage on a mixture of datasets gets one data folder per member and combines
their train splits here (mixing.py); train_metrics.json records the rows taken
from each. A killed job re-run resumes from its last complete checkpoint (resume.py).
The Trainer, its loss and its callbacks are in trainer.py; the model and its
adapter are built in model_setup.py.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass

import torch
from transformers import TrainerCallback, set_seed

from . import adalora, disk
from .atomic import atomic_dir, read_json, write_json
from .data import load_split
from .errors import FtflowError, StageError, in_stage
from .mixing import mix_train_splits
from .model_setup import check_precision, setup_for_training
from .models import device_type
from .packing import packing_collator, padding_collator
from .paths import stage_dir_of
from .progress import ProgressLog
from .provenance import provenance
from .resume import Resume, find_resume, stage_stamp, tensorboard_writer
from .specs import ExperimentSpec, StageSpec
from .status import read_status
from .trainer import AdaLoraRestore, DivergenceGuard, FtflowTrainer, build_training_arguments

log = logging.getLogger("ftflow.train")

METRICS_FILE = "train_metrics.json"  # paths.Layout.train_metrics
TRAINING_COLUMNS = ("input_ids", "labels", "length")  # what the collators take from a tokenized split


@dataclass
class Fit:
    """What one run of trainer.train gave: the Trainer's result and this run's own counts."""

    result: object
    wall_seconds: float
    tokens: int  # over all processes and, after a resume, the runs before
    label_tokens: int
    tokens_this_run: int
    label_tokens_this_run: int


def train_stage(
    config_path: str,
    stage_name: str,
    base_dir: str,
    data_dirs: list[str],
    out_dir: str,
    adapter_dir: str | None = None,
) -> dict:
    """Train one stage; `data_dirs` holds the tokenized data of each of its datasets, in the stage's order."""
    experiment = ExperimentSpec.read(config_path)
    stage = stage_of(experiment, stage_name)
    metrics_path = os.path.join(out_dir, METRICS_FILE)
    # Data-parallel (launch.py): every process runs this function; only rank 0 writes the stage's files.
    is_main = int(os.environ.get("RANK", "0")) == 0
    clear_metrics(metrics_path, is_main)
    skipped = upstream_problem(base_dir, adapter_dir)
    if skipped:
        return write_metrics(metrics_path, experiment, stage, **skipped)

    device = set_up_device(stage, experiment.name)
    train_data, eval_data, mixture = load_training_data(data_dirs, stage, experiment.name)
    checkpoints_dir, tb_dir = os.path.join(out_dir, "checkpoints"), os.path.join(out_dir, "tb")
    args = build_training_arguments(
        stage.training, stage.packing, checkpoints_dir, eval_data is not None, f"{experiment.name}/{stage.name}", device
    )
    total_step = (
        adalora.check_schedule(experiment.name, stage, len(train_data), args)
        if stage.method_info.needs_total_step
        else None
    )
    set_seed(args.seed)  # the adapter's initial weights come from the seed
    model, tokenizer, parameters = setup_for_training(stage, base_dir, adapter_dir, device, total_step)
    # Rank 0 clears stale checkpoints first; the other processes then find the same checkpoint.
    with args.main_process_first(local=False, desc="checkpoint folder"):
        stamp = stage_stamp(experiment, stage, base_dir, adapter_dir)
        resume = find_resume(checkpoints_dir, tb_dir, stamp, stage.method_info.needs_total_step, is_main)
    trainer, guard = build_trainer(stage, model, tokenizer, args, train_data, eval_data, tb_dir, resume, is_main)

    fit = run_training(trainer, resume, experiment.name, stage.name)
    status = "diverged" if guard.reason else "ok"
    if not is_main:
        return {"status": status, "rank": args.process_index}
    if status == "ok":
        save_artifact(trainer, tokenizer, stage, experiment.name, out_dir)
    extra = stage_metrics(trainer, fit, resume, stage, len(train_data), parameters, adapter_dir, device)
    extra["mixture"] = mixture
    if guard.reason:
        extra["reason"] = guard.reason
    # A diverged stage keeps nothing to resume from: re-running it with the same config diverges again.
    shutil.rmtree(checkpoints_dir, ignore_errors=True)
    return write_metrics(metrics_path, experiment, stage, status=status, **extra)


# --------------------------------------------------------------------------- set up


def stage_of(experiment: ExperimentSpec, stage_name: str) -> StageSpec:
    try:
        return experiment.stage(stage_name)
    except KeyError:
        raise FtflowError(f"experiment {experiment.name!r} has no stage {stage_name!r}") from None


def clear_metrics(metrics_path: str, is_main: bool) -> None:
    """A stale completion marker must never outlive the run that replaces it."""
    os.makedirs(os.path.dirname(metrics_path), exist_ok=True)
    if is_main and os.path.exists(metrics_path):
        os.remove(metrics_path)


def upstream_problem(base_dir: str, adapter_dir: str | None) -> dict | None:
    """{status, reason} when the stage cannot train because what it starts from did not finish ok."""
    base_status = read_status(base_dir)
    if base_status != "ok":
        return {"status": base_status, "reason": f"upstream model is {base_status}"}
    if adapter_dir:
        # init_from: adapter; a previous stage that did not finish ok saved no adapter.
        # The adapter folder sits in its stage's folder, beside that stage's metrics.
        previous = read_json(os.path.join(stage_dir_of(os.path.abspath(adapter_dir)), METRICS_FILE))
        if previous["status"] != "ok":
            return {
                "status": previous["status"],
                "reason": f"the adapter of stage {previous['stage']!r} is {previous['status']}",
            }
    return None


def set_up_device(stage: StageSpec, experiment: str) -> str:
    """'cuda' or 'cpu', after refusing settings it cannot run; a data-parallel process takes its own GPU."""
    device = device_type()
    check_precision(stage, device, experiment)
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return device


def load_training_data(data_dirs: list[str], stage: StageSpec, experiment: str):
    """(train split, validation split or None, the mixture's record or None).

    `data_dirs` are the stage's datasets' folders, in its order; a mixture's train
    splits are combined as its `mix` says. The validation split, read only when the
    stage evaluates while training, is the last dataset's: the task data the experiment
    is scored on, so the best checkpoint is picked on it (members' validation sizes
    are arbitrary; pooled, they would weigh the members by accident).
    """
    if len(data_dirs) != len(stage.datasets):
        raise StageError(
            experiment,
            stage.name,
            f"got {len(data_dirs)} data folders for the {len(stage.datasets)} datasets {list(stage.datasets)}",
        )
    members = []
    for data_dir, data_id, dataset in zip(data_dirs, stage.data_ids, stage.datasets):
        check_data_folder(data_dir, data_id, experiment, stage.name)
        train = load_split(data_dir, "train", TRAINING_COLUMNS)
        if train is None or len(train) == 0:
            raise StageError(
                experiment, stage.name, f"dataset {dataset!r}: the training split is empty after tokenization"
            )
        members.append(train)
    mixture = None
    train = members[0]
    if stage.is_mixture:
        train, mixture = mix_train_splits(members, stage.datasets, stage.data_ids, stage.mix)
        taken = ", ".join(f"{m['dataset']} {m['rows_taken']} of {m['train_rows']}" for m in mixture["members"])
        log.info("mixture (%s): %d training rows: %s", stage.mix["strategy"], len(train), taken)
        if len(train) == 0:
            raise StageError(experiment, stage.name, "mix: the mixture takes no training row")
    if stage.training.get("eval_strategy", "no") == "no":
        return train, None, mixture
    # Never the test split: choosing the best checkpoint on it would leak it into the scores.
    validation = load_split(data_dirs[-1], "validation", TRAINING_COLUMNS)
    if validation is None or len(validation) == 0:
        raise StageError(
            experiment,
            stage.name,
            f"training.eval_strategy: dataset {stage.datasets[-1]!r} has no validation rows to evaluate on",
        )
    return train, validation, mixture


def check_data_folder(data_dir: str, data_id: str, experiment: str, stage: str) -> None:
    """A data folder given in the wrong order (or of another tokenization) is refused, never trained on."""
    stats = os.path.join(data_dir, "stats.json")
    found = read_json(stats).get("data_id") if os.path.exists(stats) else data_id
    if found != data_id:
        raise StageError(experiment, stage, f"{data_dir} holds tokenized data {found!r}, expected {data_id!r}")


def build_trainer(
    stage: StageSpec, model, tokenizer, args, train_data, eval_data, tb_dir: str, resume: Resume, is_main: bool
):
    """(FtflowTrainer with its callbacks, its DivergenceGuard); on resume, with the checkpoint's counters."""
    budget = adalora.AdaLoraBudgetCallback(model) if stage.method_info.needs_total_step else None
    callbacks: list[TrainerCallback] = []
    if is_main:
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(tb_writer=tensorboard_writer(tb_dir, resume)))
    if budget is not None:
        callbacks.append(budget)
        if resume.checkpoint:
            callbacks.append(AdaLoraRestore(budget, resume.checkpoint))
    trainer = FtflowTrainer(
        model=model,
        args=args,
        data_collator=packing_collator() if stage.packing else padding_collator(tokenizer),
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        callbacks=callbacks,
        adalora_budget=budget,
    )
    guard = DivergenceGuard(trainer, stage.divergence["factor"], stage.divergence["warmup_steps"])
    trainer.add_callback(guard)
    if is_main:
        trainer.add_callback(ProgressLog(trainer))  # step, loss, tokens/s and ETA in the job log
    if resume.checkpoint:
        trainer.restore_progress(resume.checkpoint)
    return trainer, guard


# --------------------------------------------------------------------------- fit and save


def run_training(trainer: FtflowTrainer, resume: Resume, experiment: str, stage: str) -> Fit:
    """trainer.train from the resume point; token counts summed over the data-parallel processes."""
    tokens_before, label_tokens_before = trainer.tokens_seen, trainer.label_tokens_seen
    started = time.time()
    with in_stage(experiment, stage):  # e.g. no room for a checkpoint
        result = trainer.train(resume_from_checkpoint=resume.checkpoint)
    wall = time.time() - started
    if (
        trainer.adalora_budget is not None
        and trainer.args.load_best_model_at_end
        and trainer.state.best_model_checkpoint
    ):
        # the Trainer reloaded the best checkpoint's weights; its rank pattern goes with them
        adalora.adapter_config(trainer.model).rank_pattern = adalora.rank_pattern_of(
            trainer.state.best_model_checkpoint
        )
    counts = sum_over_processes(
        trainer,
        trainer.tokens_seen,
        trainer.label_tokens_seen,
        trainer.tokens_seen - tokens_before,
        trainer.label_tokens_seen - label_tokens_before,
    )
    return Fit(result, wall, *counts)


def sum_over_processes(trainer: FtflowTrainer, *counts: int) -> list[int]:
    """Counts summed over the data-parallel processes (each counts only the batches it saw); every process must call it."""
    if trainer.args.world_size <= 1:
        return list(counts)
    total = trainer.accelerator.reduce(torch.tensor(counts, device=trainer.args.device), reduction="sum")
    return [int(x) for x in total.tolist()]


def save_artifact(trainer: FtflowTrainer, tokenizer, stage: StageSpec, experiment: str, out_dir: str) -> None:
    """The stage's result, {stage}/adapter/ or {stage}/model/ as its method says, renamed into place when whole."""
    info = stage.method_info
    target = os.path.join(out_dir, info.artifact)
    with in_stage(experiment, stage.name):
        disk.require_free_space(
            out_dir, disk.tensor_bytes(trainer.model, trainable_only=info.adapter), f"the {info.artifact}"
        )
    with atomic_dir(target) as tmp:
        trainer.model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


# --------------------------------------------------------------------------- train_metrics.json


def stage_metrics(
    trainer: FtflowTrainer,
    fit: Fit,
    resume: Resume,
    stage: StageSpec,
    train_examples: int,
    parameters: dict,
    adapter_dir: str | None,
    device: str,
) -> dict:
    """Everything train_metrics.json reports about a finished run, besides its status."""
    args, state, wall = trainer.args, trainer.state, fit.wall_seconds
    return {
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "resumed_from_step": resume.step,
        "epochs": state.epoch,
        "train_examples": train_examples,
        "tokens": fit.tokens,
        "label_tokens": fit.label_tokens,
        "wall_seconds": round(wall, 2),
        # throughput of this run only (a resumed run did not redo the steps before its checkpoint)
        "tokens_per_second": round(fit.tokens_this_run / wall, 2) if wall > 0 else None,
        "label_tokens_per_second": round(fit.label_tokens_this_run / wall, 2) if wall > 0 else None,
        "data_parallel": {
            "processes": args.world_size,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        },
        **loss_record(trainer, fit),
        "trainable_parameters": parameters["trainable"],
        "total_parameters": parameters["total"],
        "init_from": stage.init_from if stage.index > 0 else "base",
        "continued_adapter": os.path.abspath(adapter_dir) if adapter_dir else None,
        **peak_memory_mb(device),
        **method_record(trainer, stage),
    }


def loss_record(trainer: FtflowTrainer, fit: Fit) -> dict:
    """The loss curve. The trainer state carries the log of the steps before a resume too,
    so a resumed stage reports its whole curve."""
    history = [h for h in trainer.state.log_history if "step" in h]
    return {
        "train_loss": fit.result.training_loss,
        "final_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
        "losses": [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
        "eval_losses": [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in history if "eval_loss" in h],
        "best_checkpoint_step": trainer.best_step() if trainer.args.load_best_model_at_end else None,
        "log_history": history,
    }


def method_record(trainer: FtflowTrainer, stage: StageSpec) -> dict:
    """What the method adds: the quantization the merge job needs, AdaLoRA's rank budget."""
    record: dict = {}
    if stage.method_info.quantized:
        record["quantization"] = stage.quantization  # merge.py loads the base unquantized in its compute dtype
    if trainer.adalora_budget is not None:
        config = adalora.adapter_config(trainer.model)
        ranks = adalora.ranks(trainer.model)
        record["adalora"] = {
            "total_step": config.total_step,
            "target_budget": config.target_r * len(ranks),
            "rank_budget": trainer.adalora_budget.budget,
            "final_ranks": ranks,
        }
    return record


def peak_memory_mb(device: str) -> dict:
    peak = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device == "cuda":
        peak["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


def write_failed_metrics(config_path: str, stage_name: str, out_dir: str, reason: str) -> dict:
    """A search trial's stage whose training raised: train_metrics.json says `failed` and why, and no
    artifact is written, so merge and eval pass the status on (as for a diverged stage) instead of loading
    a model. Checkpoints stay: a forced re-run of the trial resumes from them."""
    experiment = ExperimentSpec.read(config_path)
    return write_metrics(
        os.path.join(out_dir, METRICS_FILE), experiment, stage_of(experiment, stage_name), "failed", reason=reason
    )


def write_metrics(path: str, experiment: ExperimentSpec, stage: StageSpec, status: str, **extra) -> dict:
    data = {
        "experiment": experiment.name,
        "stage": stage.name,
        "method": stage.method,
        "status": status,
        **extra,
        "provenance": provenance(experiment.config_hash),
    }
    write_json(path, data)
    return data
