"""AdaLoRA under the HF Trainer: the rank schedule, its budget record, and its checkpoints.

PEFT's AdaLoRA prunes ranks only when `update_and_allocate(step)` is called
after each optimizer step, and HF Trainer never calls it: without
`AdaLoraBudgetCallback` AdaLoRA silently trains as a fixed-rank LoRA.

The schedule over `total_step` optimizer steps (0-based step s):

    s <= tinit                      all init_r ranks kept (warm-up)
    tinit < s < total - tfinal      budget falls cubically to target_r x modules;
                                    the least important ranks are masked every deltaT steps
    s == total - tfinal             final mask; from then on the rank pattern is fixed

So a schedule with `tinit >= total_step - tfinal` never prunes anything;
the planner rejects it before any job runs when the step count is known then,
and `check_schedule` rejects it here with the exact count.

Checkpoints. PEFT saves an AdaLoRA adapter with its ranks cut to the current
`rank_pattern`; a mid-training checkpoint saved that way cannot be loaded back
into the full-size modules the run continues with. FtflowTrainer therefore
saves checkpoints at full size (masked ranks are zeros), and this module keeps
beside them what the schedule needs to go on exactly as before: the rank
pattern, the importance averages and the budget record.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator

import torch
from transformers import TrainerCallback

from .errors import StageError
from .schedule import adalora_schedule_problem, optimizer_steps
from .specs import StageSpec

STATE_FILE = "ftflow_adalora.json"
IMPORTANCE_FILE = "ftflow_adalora_importance.safetensors"


def adapter_config(model):
    """The AdaLoraConfig of a PeftModel's trainable adapter (`model.base_model` is the AdaLoraModel)."""
    tuner = model.base_model
    return tuner.peft_config[tuner.trainable_adapter_name]


def total_steps_for(num_examples: int, args) -> int:
    """Optimizer steps the Trainer will take with these arguments (what the schedule is laid over)."""
    return optimizer_steps(
        train_rows=num_examples,
        per_device_batch=args.per_device_train_batch_size,
        accumulation=args.gradient_accumulation_steps,
        epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        processes=max(1, int(os.environ.get("WORLD_SIZE", "1"))),
        drop_last=args.dataloader_drop_last,
    )


def check_schedule(experiment: str, stage: StageSpec, num_examples: int, args) -> int:
    """The exact total_step of this run; StageError when the schedule has no budgeting phase."""
    total = total_steps_for(num_examples, args)
    problem = adalora_schedule_problem(stage.adalora, total)
    if problem:
        how = (
            f"max_steps {args.max_steps}"
            if args.max_steps > 0
            else f"{num_examples} training examples / batch {args.per_device_train_batch_size}"
            f" / accumulation {args.gradient_accumulation_steps} x {args.num_train_epochs:g} epochs"
        )
        raise StageError(experiment, stage.name, f"adalora: {problem}; total_step {total} comes from {how}")
    return total


def ranks(model) -> dict[str, int]:
    """Ranks kept per adapted module: the allocator's current rank pattern (init_r each before any mask)."""
    config = adapter_config(model)
    if config.rank_pattern:
        return {
            _module_name(key): int(sum(bool(x) for x in _as_list(keep))) for key, keep in config.rank_pattern.items()
        }
    name = model.base_model.trainable_adapter_name
    return {
        module_name: int(module.lora_E[name].shape[0])
        for module_name, module in model.named_modules()
        if _is_adalora_layer(module, name)
    }


def _is_adalora_layer(module, adapter: str) -> bool:
    lora_e = getattr(module, "lora_E", None)
    return lora_e is not None and hasattr(lora_e, "keys") and adapter in lora_e


def _module_name(rank_pattern_key: str) -> str:
    """'base_model.model.model.layers.0.mlp.up_proj.lora_E.default' -> 'base_model.model.model.layers.0.mlp.up_proj'."""
    return rank_pattern_key.split(".lora_E")[0]


def _as_list(keep) -> list:
    return keep.tolist() if torch.is_tensor(keep) else list(keep)


def orthogonality_penalty(model) -> torch.Tensor:
    """Mean over the adapter's A and B of ||P Pᵀ - I||_F (P = A, or Bᵀ): AdaLoRA's regulariser.

    PEFT adds it to `outputs.loss` only when the model computes its own loss;
    FtflowTrainer computes the loss itself (logits on labelled positions
    only), so it adds this term instead.
    """
    name = model.base_model.trainable_adapter_name
    terms = []
    for param_name, param in model.named_parameters():
        if f"lora_A.{name}" in param_name:
            gram = param @ param.T  # (r, r)
        elif f"lora_B.{name}" in param_name:
            gram = param.T @ param  # (r, r)
        else:
            continue
        identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        terms.append(torch.linalg.matrix_norm(gram - identity))
    return torch.stack(terms).mean()


def refresh_for_new_stage(model, stage_settings: dict, total: int) -> None:
    """A continued AdaLoRA adapter takes this stage's schedule and starts a fresh budget.

    The adapter's shape (init_r, target modules, alpha) is the previous
    stage's; its modules were already cut to that stage's final ranks when it
    was loaded, so the budget starts from the ranks it has now.
    """
    from peft.tuners.adalora.layer import RankAllocator

    config = adapter_config(model)
    for key in ("target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight"):
        setattr(config, key, stage_settings[key])
    config.total_step = total
    tuner = model.base_model
    tuner.rankallocator = RankAllocator(tuner.model, config, tuner.trainable_adapter_name)


@contextlib.contextmanager
def unpruned_save(model) -> Iterator[None]:
    """Saves inside it are at full size (rank_pattern set aside), as mid-training checkpoints need."""
    config = adapter_config(model)
    pattern = config.rank_pattern
    config.rank_pattern = None
    try:
        yield
    finally:
        config.rank_pattern = pattern


class AdaLoraBudgetCallback(TrainerCallback):
    """Calls AdaLoRA's `update_and_allocate` after every optimizer step; records the rank budget.

    `on_optimizer_step` runs after `optimizer.step()` and before the gradients
    are zeroed (which importance scores need), while `state.global_step` still
    counts the steps before this one: the 0-based step PEFT's schedule expects.
    """

    def __init__(self, model):
        self.model = model
        # [{step, budget, ranks_kept}] every deltaT steps and around the final mask: the
        # allocator's budget (ranks summed over modules) and the ranks its mask keeps
        self.budget: list[dict] = []

    def on_optimizer_step(self, args, state, control, **kwargs):
        step = state.global_step
        tuner = self.model.base_model
        tuner.update_and_allocate(step)
        config = adapter_config(self.model)
        final_step = config.total_step - config.tfinal
        if step % max(1, config.deltaT) == 0 or step >= final_step - 1:
            budget, _ = tuner.rankallocator.budget_schedule(step)
            self.budget.append({"step": step + 1, "budget": int(budget), "ranks_kept": sum(ranks(self.model).values())})

    # ------------------------------------------------------------------ checkpoints

    def save_state(self, folder: str) -> None:
        """Write the schedule's state into a checkpoint folder (before its completion marker)."""
        from safetensors.torch import save_file

        allocator = self.model.base_model.rankallocator
        pattern = adapter_config(self.model).rank_pattern
        tensors = {}
        for key, table in (("ipt", allocator.ipt), ("avg", allocator.exp_avg_ipt), ("unc", allocator.exp_avg_unc)):
            for name, value in table.items():
                tensors[f"{key}:{name}"] = value.detach().contiguous().cpu()
        save_file(tensors, os.path.join(folder, IMPORTANCE_FILE))
        state = {"rank_pattern": _plain(pattern), "budget": self.budget}
        with open(os.path.join(folder, STATE_FILE), "w", encoding="utf-8") as handle:
            json.dump(state, handle)

    def load_state(self, folder: str) -> None:
        """Restore what `save_state` wrote; the Trainer has loaded the full-size weights already."""
        from safetensors.torch import load_file

        with open(os.path.join(folder, STATE_FILE), encoding="utf-8") as handle:
            state = json.load(handle)
        allocator = self.model.base_model.rankallocator
        allocator.reset_ipt()
        device = next(p.device for p in self.model.parameters())
        # All three tables: PEFT restarts the averages of a parameter missing from `ipt`.
        tables = {"ipt": allocator.ipt, "avg": allocator.exp_avg_ipt, "unc": allocator.exp_avg_unc}
        for key, value in load_file(os.path.join(folder, IMPORTANCE_FILE)).items():
            kind, name = key.split(":", 1)
            tables[kind][name] = value.to(device)
        adapter_config(self.model).rank_pattern = state["rank_pattern"]
        self.budget = state["budget"]


def checkpoint_has_state(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, STATE_FILE)) and os.path.exists(os.path.join(folder, IMPORTANCE_FILE))


def rank_pattern_of(folder: str):
    with open(os.path.join(folder, STATE_FILE), encoding="utf-8") as handle:
        return json.load(handle)["rank_pattern"]


def _plain(pattern):
    if pattern is None:
        return None
    return {name: [bool(x) for x in _as_list(keep)] for name, keep in pattern.items()}
