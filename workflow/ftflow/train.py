"""train: one stage of one experiment, with the HF Trainer.

    set up data -> set up model -> train (resuming from the last checkpoint) -> save

Stage folder `results/{experiment}/{stage}/`:
  checkpoints/         Trainer checkpoints while running (removed once the stage ends)
  adapter/ | model/    the result (PEFT adapter, or full weights), renamed into place;
                       never written for a diverged stage
  tb/                  TensorBoard event files (train/ and eval/ scalars)
  train_metrics.json   written last: steps, tokens, tokens/s, losses, memory, status

Resuming. A checkpoint is complete once its trainer_state.json is whole (the
Trainer writes it last); ftflow's own progress (token counts, AdaLoRA's rank
schedule) is written into the folder before it. A re-run of a killed job
resumes from the newest complete checkpoint of the same stage config: the
Trainer restores weights, optimizer, scheduler, RNG and data position; the
divergence guard rebuilds its starting loss from the restored log; TensorBoard
purges the steps the killed run logged after that checkpoint, so the curve
continues instead of doubling back.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import time

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from . import adalora, disk, models
from .atomic import atomic_dir, read_json, write_json
from .errors import FtflowError, StageError, in_stage
from .launch import data_parallel_training_values
from .packing import packing_collator
from .provenance import provenance

log = logging.getLogger("ftflow.train")

STAGE_STAMP = "ftflow_stage.json"
PROGRESS_FILE = "ftflow_progress.json"  # in each checkpoint: ftflow's counters at that step


# --------------------------------------------------------------------------- trainer pieces


class FtflowTrainer(Trainer):
    """Trainer that computes logits only where a label is, and counts tokens.

    For packed rows the LM head (vocab x hidden) runs on the positions that
    predict a labelled token only: prompts and system turns cost no logits.
    """

    def __init__(self, *args, adalora_budget: "adalora.AdaLoraBudgetCallback | None" = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokens_seen = 0
        self.label_tokens_seen = 0
        self.nonfinite_loss = False
        self.adalora_budget = adalora_budget
        self.orthogonality_weight = adalora.adapter_config(self.model).orth_reg_weight if adalora_budget else 0.0

    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs.get("attention_mask")  # padded batches (packing: false) carry one; packed rows have no pads
        self.tokens_seen += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
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
        if self.orthogonality_weight > 0:
            penalty = self.orthogonality_weight * adalora.orthogonality_penalty(model)
            # once per optimizer step, whatever the number of micro-batches it is spread over
            loss = loss + (penalty / self.current_gradient_accumulation_steps if self.loss_is_scaled_for_ga else penalty)
        return loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints (`_internal_call`) also carry ftflow's progress; AdaLoRA ones keep full-size ranks."""
        if not (_internal_call and output_dir):
            return super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            full = not hasattr(self.model, "peft_config")
            disk.require_free_space(output_dir, disk.checkpoint_bytes(self.model, full), os.path.basename(output_dir))
        if self.adalora_budget is None:
            super().save_model(output_dir, _internal_call)
        else:
            with adalora.unpruned_save(self.model):
                super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            # Written before the Trainer's trainer_state.json, which marks the checkpoint complete.
            if self.adalora_budget is not None:
                self.adalora_budget.save_state(output_dir)
            write_json(os.path.join(output_dir, PROGRESS_FILE), {"tokens": self.tokens_seen, "label_tokens": self.label_tokens_seen})

    def restore_progress(self, checkpoint: str) -> None:
        """Counters and AdaLoRA schedule as they were at `checkpoint` (see save_model)."""
        progress = read_json(os.path.join(checkpoint, PROGRESS_FILE))
        self.tokens_seen, self.label_tokens_seen = progress["tokens"], progress["label_tokens"]


class DivergenceGuard(TrainerCallback):
    """Stops a stage whose loss is NaN/inf or exceeds `factor` x its starting value."""

    def __init__(self, trainer: FtflowTrainer, factor: float, warmup_steps: int):
        self.trainer = trainer
        self.factor = factor
        self.warmup_steps = warmup_steps
        self.start_losses: list[float] = []
        self.reason: str | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        # On resume the Trainer has restored the log of the steps before the checkpoint:
        # the starting loss is theirs, not that of the first steps after the restart.
        self.start_losses = [h["loss"] for h in state.log_history if "loss" in h][: self.warmup_steps]

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


class AdaLoraRestore(TrainerCallback):
    """Puts AdaLoRA's schedule state back once the Trainer has loaded a checkpoint's weights.

    It cannot be earlier: with a rank pattern set, PEFT would cut the modules
    to it while loading the checkpoint's full-size weights.
    """

    def __init__(self, budget: "adalora.AdaLoraBudgetCallback", checkpoint: str):
        self.budget = budget
        self.checkpoint = checkpoint

    def on_train_begin(self, args, state, control, **kwargs):
        self.budget.load_state(self.checkpoint)


# --------------------------------------------------------------------------- steps


def _wait_for_later_event_file_name(tb_dir: str) -> None:
    """Readers replay event files in name order, and a name starts with its writer's second.

    A run resumed within the second its killed predecessor started would get a name
    that may sort first (the tie is broken by host and pid), and its purge of the
    killed run's late steps would be replayed before those steps. Waiting for the
    next second keeps the resumed file last.
    """
    seconds = []
    for name in os.listdir(tb_dir) if os.path.isdir(tb_dir) else []:
        parts = name.split(".")
        if name.startswith("events.out.tfevents.") and len(parts) > 3 and parts[3].isdigit():
            seconds.append(int(parts[3]))
    if seconds:
        while int(time.time()) <= max(seconds):
            time.sleep(0.05)


def _last_checkpoint(folder: str, stamp: dict, needs_adalora_state: bool) -> str | None:
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
        step = entry.removeprefix("checkpoint-")
        if entry.startswith("checkpoint-") and step.isdigit() and _checkpoint_complete(path, needs_adalora_state):
            candidates.append((int(step), path))
    return max(candidates)[1] if candidates else None


def _checkpoint_complete(path: str, needs_adalora_state: bool) -> bool:
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as handle:
            json.load(handle)  # a kill mid-write leaves it truncated
    except (OSError, ValueError):
        return False
    if not os.path.exists(os.path.join(path, PROGRESS_FILE)):
        return False
    return adalora.checkpoint_has_state(path) or not needs_adalora_state


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
    method = stage["method"]
    metrics_path = os.path.join(out_dir, "train_metrics.json")
    os.makedirs(out_dir, exist_ok=True)
    # Data-parallel (launch.py): every process runs this function; only rank 0 writes the stage's files.
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main and os.path.exists(metrics_path):
        os.remove(metrics_path)  # a stale marker must never outlive the run that replaces it

    base_status = models.read_status(base_dir)
    if base_status != "ok":
        return _write_metrics(metrics_path, experiment, stage, status=base_status, reason=f"upstream model is {base_status}")
    if adapter_dir:
        # init_from: adapter; a previous stage that did not finish ok saved no adapter
        previous = read_json(os.path.join(os.path.dirname(os.path.abspath(adapter_dir)), "train_metrics.json"))
        if previous["status"] != "ok":
            return _write_metrics(metrics_path, experiment, stage, status=previous["status"], reason=f"the adapter of stage {previous['stage']!r} is {previous['status']}")

    device = models.device_type()
    models.check_precision(stage, device, exp_name)
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # one device per data-parallel process

    # 1. data
    train_data, eval_data = models.load_training_data(data_dir, stage, exp_name)
    if len(train_data) == 0:
        raise StageError(exp_name, stage_name, "the training split is empty after tokenization")
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    args = build_training_arguments(stage, ckpt_dir, eval_data is not None, f"{exp_name}/{stage_name}", device)
    total_step = adalora.check_schedule(exp_name, stage, len(train_data), args) if method == "adalora" else None

    # 2. model (the adapter's initial weights come from the seed)
    set_seed(args.seed)
    model, tokenizer, trainable = models.setup_for_training(stage, base_dir, adapter_dir, device, total_step)
    collator = packing_collator() if stage["packing"] else models.padding_collator(tokenizer)

    # 3. train, from the last complete checkpoint of this exact stage config
    tb_dir = os.path.join(out_dir, "tb")
    stamp = {"config_hash": models.stage_fingerprint(experiment, stage), "base": os.path.abspath(base_dir), "adapter": adapter_dir and os.path.abspath(adapter_dir)}
    # Rank 0 clears stale checkpoints first; the other processes then find the same checkpoint.
    with args.main_process_first(local=False, desc="checkpoint folder"):
        resume = _last_checkpoint(ckpt_dir, stamp, needs_adalora_state=method == "adalora")
        if is_main:
            if resume is None and os.path.isdir(tb_dir):
                shutil.rmtree(tb_dir)
            os.makedirs(ckpt_dir, exist_ok=True)
            write_json(os.path.join(ckpt_dir, STAGE_STAMP), stamp)
    resumed_from = int(os.path.basename(resume).split("-")[1]) if resume else 0

    budget = adalora.AdaLoraBudgetCallback(model) if method == "adalora" else None
    callbacks: list[TrainerCallback] = []
    if is_main:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        # purge_step: TensorBoard drops what the killed run logged after the checkpoint (steps > resumed_from).
        if resume:
            _wait_for_later_event_file_name(tb_dir)
        writer = SummaryWriter(log_dir=tb_dir, purge_step=resumed_from + 1 if resume else None)
        callbacks.append(TensorBoardCallback(tb_writer=writer))
    if budget is not None:
        callbacks.append(budget)
        if resume:
            callbacks.append(AdaLoraRestore(budget, resume))
    trainer = FtflowTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        callbacks=callbacks,
        adalora_budget=budget,
    )
    guard = DivergenceGuard(trainer, stage["divergence"]["factor"], stage["divergence"]["warmup_steps"])
    trainer.add_callback(guard)
    if resume:
        trainer.restore_progress(resume)
    tokens_before, label_tokens_before = trainer.tokens_seen, trainer.label_tokens_seen

    started = time.time()
    with in_stage(exp_name, stage_name):  # e.g. no room for a checkpoint
        result = trainer.train(resume_from_checkpoint=resume)
    wall = time.time() - started
    if budget is not None and args.load_best_model_at_end and trainer.state.best_model_checkpoint:
        # the Trainer reloaded the best checkpoint's weights; its rank pattern goes with them
        adalora.adapter_config(trainer.model).rank_pattern = adalora.rank_pattern_of(trainer.state.best_model_checkpoint)

    # 4. save
    status = "diverged" if guard.reason else "ok"
    tokens_seen, label_tokens_seen, tokens_this_run, label_tokens_this_run = _sum_over_processes(
        trainer,
        trainer.tokens_seen,
        trainer.label_tokens_seen,
        trainer.tokens_seen - tokens_before,
        trainer.label_tokens_seen - label_tokens_before,
    )
    if not is_main:
        return {"status": status, "rank": args.process_index}
    if status == "ok":
        target = os.path.join(out_dir, "model" if method == "full" else "adapter")
        with in_stage(exp_name, stage_name):
            disk.require_free_space(out_dir, disk.tensor_bytes(trainer.model, trainable_only=method != "full"), f"the {os.path.basename(target)}")
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
        # throughput of this run only (a resumed run did not redo the steps before its checkpoint)
        "tokens_per_second": round(tokens_this_run / wall, 2) if wall > 0 else None,
        "label_tokens_per_second": round(label_tokens_this_run / wall, 2) if wall > 0 else None,
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
        "best_checkpoint_step": _best_step(trainer) if args.load_best_model_at_end else None,
        "log_history": history,
        "trainable_parameters": trainable["trainable"],
        "total_parameters": trainable["total"],
        "init_from": stage["init_from"] if stage["index"] > 0 else "base",
        "continued_adapter": os.path.abspath(adapter_dir) if adapter_dir else None,
        **_peak_memory_mb(device),
    }
    if method == "qlora":
        extra["quantization"] = stage["quantization"]  # merge.py loads the base unquantized in its compute dtype
    if budget is not None:
        config = adalora.adapter_config(trainer.model)
        extra["adalora"] = {
            "total_step": config.total_step,
            "target_budget": config.target_r * len(adalora.ranks(trainer.model)),
            "rank_budget": budget.budget,
            "final_ranks": adalora.ranks(trainer.model),
        }
    if guard.reason:
        extra["reason"] = guard.reason
    # A diverged stage keeps nothing to resume from: re-running it with the same config diverges again.
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return _write_metrics(metrics_path, experiment, stage, status=status, **extra)


def _best_step(trainer: Trainer) -> int | None:
    best = trainer.state.best_model_checkpoint
    return int(best.rsplit("-", 1)[1]) if best else None


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
    from .hashing import content_hash

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
