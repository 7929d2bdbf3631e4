"""train: one stage of one experiment, with the HF Trainer.

    set up model -> set up data -> train (resuming from the last checkpoint) -> save

Stage folder `results/{experiment}/{stage}/`:
  checkpoints/         Trainer checkpoints while running (removed after success)
  adapter/ | model/    the result (PEFT adapter, or full weights), renamed into place
  tb/                  TensorBoard event files
  train_metrics.json   written last: steps, tokens, tokens/s, losses, memory, status
"""

from __future__ import annotations

import logging
import math
import os
import resource
import shutil
import time

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from . import models
from .atomic import atomic_dir, read_json, write_json
from .errors import FtflowError, StageError
from .launch import data_parallel_training_values
from .packing import packing_collator
from .provenance import provenance

log = logging.getLogger("ftflow.train")

STAGE_STAMP = "ftflow_stage.json"


# --------------------------------------------------------------------------- trainer pieces


class FtflowTrainer(Trainer):
    """Trainer that computes logits only where a label is, and counts tokens.

    For packed rows the LM head (vocab x hidden) runs on the positions that
    predict a labelled token only: prompts and system turns cost no logits.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokens_seen = 0
        self.label_tokens_seen = 0
        self.nonfinite_loss = False

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.tokens_seen += int(inputs["input_ids"].numel())
        self.label_tokens_seen += int((inputs["labels"][:, 1:] != -100).sum())
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            self.nonfinite_loss = True
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        if return_outputs or labels is None or labels.shape[0] != 1 or self.label_smoother is not None:
            self.loss_is_scaled_for_ga = None
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        targets = labels[0, 1:]
        keep = (targets != -100).nonzero().squeeze(-1)
        outputs = model(**inputs, logits_to_keep=keep)
        logits = outputs.logits[0].float()
        loss = F.cross_entropy(logits, targets[keep], reduction="sum")
        if num_items_in_batch is not None:
            self.loss_is_scaled_for_ga = True
            loss = loss / num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch) else loss / num_items_in_batch
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                # num_items_in_batch counts every process's tokens and DDP averages the
                # gradients over processes: scale back up, as Trainer.compute_loss does.
                loss = loss * self.accelerator.num_processes
        else:
            self.loss_is_scaled_for_ga = False
            loss = loss / max(int(keep.numel()), 1)
        return loss


class DivergenceGuard(TrainerCallback):
    """Stops a stage whose loss is NaN/inf or exceeds `factor` x its starting value."""

    def __init__(self, trainer: FtflowTrainer, factor: float, warmup_steps: int):
        self.trainer = trainer
        self.factor = factor
        self.warmup_steps = warmup_steps
        self.start_losses: list[float] = []
        self.reason: str | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.nonfinite_loss and self.reason is None:
            self.reason = f"non-finite loss at step {state.global_step}"
            control.should_training_stop = True
            control.should_save = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is None or self.reason is not None:
            return
        if not math.isfinite(loss):
            self.reason = f"non-finite loss at step {state.global_step}"
        elif len(self.start_losses) < self.warmup_steps:
            self.start_losses.append(loss)
        else:
            start = sum(self.start_losses) / len(self.start_losses)
            if loss > self.factor * start:
                self.reason = f"loss {loss:.4g} at step {state.global_step} exceeds {self.factor:g} x starting loss {start:.4g}"
        if self.reason:
            control.should_training_stop = True
            control.should_save = False


class AdaLoraBudgetCallback(TrainerCallback):
    """Calls AdaLoRA's `update_and_allocate` after every optimizer step.

    HF Trainer never calls it, so without this AdaLoRA trains as plain LoRA
    with a fixed rank. Records the rank budget over time.
    """

    def __init__(self, model):
        self.model = model
        self.budget: list[dict] = []

    def on_optimizer_step(self, args, state, control, **kwargs):
        tuner = self.model.base_model
        tuner.update_and_allocate(state.global_step)
        if state.global_step % max(1, tuner.peft_config[tuner.trainable_adapter_name].deltaT) == 0:
            self.budget.append({"step": state.global_step, "total_rank": models.adalora_total_rank(self.model)})


# --------------------------------------------------------------------------- steps


def _last_checkpoint(folder: str, stamp: dict) -> str | None:
    """The newest complete checkpoint of this exact stage config, else None (and stale ones removed)."""
    if not os.path.isdir(folder):
        return None
    stamp_path = os.path.join(folder, STAGE_STAMP)
    if not os.path.exists(stamp_path) or read_json(stamp_path) != stamp:
        shutil.rmtree(folder)
        return None
    candidates = []
    for entry in os.listdir(folder):
        path = os.path.join(folder, entry)
        if entry.startswith("checkpoint-") and os.path.exists(os.path.join(path, "trainer_state.json")):
            try:
                candidates.append((int(entry.split("-")[1]), path))
            except ValueError:
                continue
    return max(candidates)[1] if candidates else None


def _peak_memory_mb(device: str) -> dict:
    peak = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device == "cuda":
        peak["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


def train_stage(config_path: str, stage_name: str, base_dir: str, data_dir: str, out_dir: str, adapter_dir: str | None = None) -> dict:
    experiment = read_json(config_path)
    stage = next((s for s in experiment["stages"] if s["name"] == stage_name), None)
    if stage is None:
        raise FtflowError(f"experiment {experiment['name']!r} has no stage {stage_name!r}")
    exp_name = experiment["name"]
    metrics_path = os.path.join(out_dir, "train_metrics.json")
    os.makedirs(out_dir, exist_ok=True)
    # Data-parallel (launch.py): every process runs this function; only rank 0 writes the stage's files.
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main and os.path.exists(metrics_path):
        os.remove(metrics_path)  # a stale marker must never outlive the run that replaces it

    base_status = models.read_status(base_dir)
    if base_status != "ok":
        return _write_metrics(metrics_path, experiment, stage, status=base_status, reason=f"upstream model is {base_status}")

    device = models.device_type()
    models.check_precision(stage, device, exp_name)
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # one device per data-parallel process
    torch.manual_seed(stage["training"].get("seed", 42))

    # 1. model
    model, tokenizer, trainable = models.setup_for_training(stage, base_dir, adapter_dir, device)

    # 2. data
    train_data, eval_data = models.load_training_data(data_dir, stage)
    if len(train_data) == 0:
        raise StageError(exp_name, stage_name, "the training split is empty after tokenization")
    collator = packing_collator() if stage["packing"] else models.padding_collator(tokenizer)

    # 3. train
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    tb_dir = os.path.join(out_dir, "tb")
    stamp = {"config_hash": models.stage_fingerprint(experiment, stage), "base": os.path.abspath(base_dir)}
    args = build_training_arguments(stage, ckpt_dir, eval_data is not None, f"{exp_name}/{stage_name}", device)
    # Rank 0 clears stale checkpoints first; the other processes then find the same checkpoint.
    with args.main_process_first(local=False, desc="checkpoint folder"):
        resume = _last_checkpoint(ckpt_dir, stamp)
        if is_main:
            if resume is None and os.path.isdir(tb_dir):
                shutil.rmtree(tb_dir)
            os.makedirs(ckpt_dir, exist_ok=True)
            write_json(os.path.join(ckpt_dir, STAGE_STAMP), stamp)

    if stage["method"] == "adalora":
        models.set_adalora_total_step(model, stage, len(train_data), args, exp_name)

    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    trainer = FtflowTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        callbacks=[TensorBoardCallback(tb_writer=SummaryWriter(log_dir=tb_dir))] if is_main else [],
    )
    guard = DivergenceGuard(trainer, stage["divergence"]["factor"], stage["divergence"]["warmup_steps"])
    trainer.add_callback(guard)
    budget = None
    if stage["method"] == "adalora":
        budget = AdaLoraBudgetCallback(model)
        trainer.add_callback(budget)

    resumed_from = int(os.path.basename(resume).split("-")[1]) if resume else 0
    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    wall = time.time() - started

    # 4. save
    status = "diverged" if guard.reason else "ok"
    tokens_seen, label_tokens_seen = _sum_over_processes(trainer, trainer.tokens_seen, trainer.label_tokens_seen)
    if not is_main:
        return {"status": status, "rank": args.process_index}
    if status == "ok":
        target = os.path.join(out_dir, "model" if stage["method"] == "full" else "adapter")
        with atomic_dir(target) as tmp:
            trainer.model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    # The trainer state carries the log of the steps before a resume too, so a
    # resumed stage reports its whole loss curve.
    history = [h for h in trainer.state.log_history if "step" in h]
    extra = {
        "steps": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "resumed_from_step": resumed_from,
        "epochs": trainer.state.epoch,
        "train_examples": len(train_data),
        "tokens": tokens_seen,
        "label_tokens": label_tokens_seen,
        "wall_seconds": round(wall, 2),
        "tokens_per_second": round(tokens_seen / wall, 2) if wall > 0 else None,
        "label_tokens_per_second": round(label_tokens_seen / wall, 2) if wall > 0 else None,
        "data_parallel": {
            "processes": args.world_size,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        },
        "train_loss": result.training_loss,
        "final_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
        "losses": [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
        "eval_losses": [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in history if "eval_loss" in h],
        "log_history": history,
        "trainable_parameters": trainable["trainable"],
        "total_parameters": trainable["total"],
        **_peak_memory_mb(device),
    }
    if budget is not None:
        extra["rank_budget"] = budget.budget
        extra["final_ranks"] = models.adalora_ranks(trainer.model)
    if guard.reason:
        extra["reason"] = guard.reason
    if status == "ok":
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return _write_metrics(metrics_path, experiment, stage, status=status, **extra)


def _sum_over_processes(trainer: Trainer, *counts: int) -> list[int]:
    """Counts summed over the data-parallel processes (each counts only the batches it saw)."""
    if trainer.args.world_size <= 1:
        return list(counts)
    total = trainer.accelerator.reduce(torch.tensor(counts, device=trainer.args.device), reduction="sum")
    return [int(x) for x in total.tolist()]


def build_training_arguments(stage: dict, output_dir: str, has_eval: bool, run_name: str, device: str) -> TrainingArguments:
    # With k data-parallel processes each takes 1/k of the configured effective batch (launch.py).
    values = data_parallel_training_values(dict(stage["training"]), int(os.environ.get("WORLD_SIZE", "1")))
    values.setdefault("logging_nan_inf_filter", False)  # a NaN must show in the log, not be averaged away
    if not has_eval:
        values["eval_strategy"] = "no"
        values.pop("load_best_model_at_end", None)
    if not stage["packing"]:
        values.setdefault("train_sampling_strategy", "group_by_length")
    values["use_cpu"] = device == "cpu"
    return TrainingArguments(
        output_dir=output_dir,
        report_to="none",
        run_name=run_name,
        remove_unused_columns=False,
        **values,
    )


def _write_metrics(path: str, experiment: dict, stage: dict, status: str, **extra) -> dict:
    from .config import content_hash

    data = {
        "experiment": experiment["name"],
        "stage": stage["name"],
        "method": stage["method"],
        "status": status,
        **extra,
        "provenance": provenance(content_hash(experiment)),
    }
    write_json(path, data)
    return data
