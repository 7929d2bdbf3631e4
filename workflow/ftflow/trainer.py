"""The HF Trainer as ftflow runs it: its arguments, its loss, its checkpoints, and its callbacks.

FtflowTrainer differs from transformers' Trainer in three places:
  compute_loss   logits only where a label is (loss.py), plus AdaLoRA's
                 orthogonality penalty, which PEFT adds only to a loss the model computes
  training_step  counts input and label tokens (for tokens/s) and notes a non-finite loss
  save_model     checkpoints check free disk first, keep AdaLoRA ranks at full
                 size, and carry ftflow's progress (resume.py reads it back)
"""

from __future__ import annotations

import math
import os

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from . import adalora, disk
from .atomic import read_json, write_json
from .encoding import IGNORE
from .launch import data_parallel_training_values
from .loss import labelled_positions, summed_label_loss
from .resume import PROGRESS_FILE


def build_training_arguments(
    training: dict, packing: bool, output_dir: str, has_eval: bool, run_name: str, device: str
) -> TrainingArguments:
    """A stage's `training` section as TrainingArguments, with what ftflow sets itself."""
    # With k data-parallel processes each takes 1/k of the configured effective batch (launch.py).
    values = data_parallel_training_values(dict(training), int(os.environ.get("WORLD_SIZE", "1")))
    values.setdefault("logging_nan_inf_filter", False)  # a NaN must show in the log, not be averaged away
    if not has_eval:
        values["eval_strategy"] = "no"
        values.pop("load_best_model_at_end", None)
    if not packing:
        values.setdefault("train_sampling_strategy", "group_by_length")
    values["use_cpu"] = device == "cpu"
    return TrainingArguments(
        output_dir=output_dir,
        report_to="none",
        run_name=run_name,
        remove_unused_columns=False,
        **values,
    )


class FtflowTrainer(Trainer):
    """Trainer that computes logits only where a label is, and counts tokens."""

    def __init__(self, *args, adalora_budget: adalora.AdaLoraBudgetCallback | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokens_seen = 0
        self.label_tokens_seen = 0
        self.nonfinite_loss = False
        self.adalora_budget = adalora_budget
        self.orthogonality_weight = adalora.adapter_config(self.model).orth_reg_weight if adalora_budget else 0.0

    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs.get("attention_mask")  # padded batches (packing: false) carry one; packed rows have no pads
        self.tokens_seen += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        self.label_tokens_seen += int((inputs["labels"][:, 1:] != IGNORE).sum())
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            self.nonfinite_loss = True
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        if return_outputs or labels is None or labels.shape[0] != 1 or self.label_smoother is not None:
            # padded batches (several rows) and evaluation: the Trainer's own loss
            self.loss_is_scaled_for_ga = None
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        targets, keep = labelled_positions(labels)
        loss = summed_label_loss(model, {k: v for k, v in inputs.items() if k != "labels"}, targets, keep)
        if num_items_in_batch is not None:
            self.loss_is_scaled_for_ga = True
            loss = (
                loss / num_items_in_batch.to(loss.device)
                if torch.is_tensor(num_items_in_batch)
                else loss / num_items_in_batch
            )
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
            loss = loss + (
                penalty / self.current_gradient_accumulation_steps if self.loss_is_scaled_for_ga else penalty
            )
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
            write_json(
                os.path.join(output_dir, PROGRESS_FILE),
                {"tokens": self.tokens_seen, "label_tokens": self.label_tokens_seen},
            )

    def restore_progress(self, checkpoint: str) -> None:
        """Counters as they were at `checkpoint` (see save_model)."""
        progress = read_json(os.path.join(checkpoint, PROGRESS_FILE))
        self.tokens_seen, self.label_tokens_seen = progress["tokens"], progress["label_tokens"]

    def best_step(self) -> int | None:
        """The step of the checkpoint load_best_model_at_end chose, if it chose one."""
        best = self.state.best_model_checkpoint
        return int(best.rsplit("-", 1)[1]) if best else None


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
                self.reason = (
                    f"loss {loss:.4g} at step {state.global_step} exceeds {self.factor:g} x starting loss {start:.4g}"
                )
        if self.reason:
            control.should_training_stop = True
            control.should_save = False


class AdaLoraRestore(TrainerCallback):
    """Puts AdaLoRA's schedule state back once the Trainer has loaded a checkpoint's weights.

    It cannot be earlier: with a rank pattern set, PEFT would cut the modules
    to it while loading the checkpoint's full-size weights.
    """

    def __init__(self, budget: adalora.AdaLoraBudgetCallback, checkpoint: str):
        self.budget = budget
        self.checkpoint = checkpoint

    def on_train_begin(self, args, state, control, **kwargs):
        self.budget.load_state(self.checkpoint)
