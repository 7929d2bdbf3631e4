"""Step counts and batch splits: arithmetic the planner and the jobs must agree on.

The planner checks an AdaLoRA schedule and a multi-GPU batch split before any
job runs; the train job and the launcher apply the same numbers. Standard
library only: the planner imports it.
"""

from __future__ import annotations

import math


class BatchSplitError(ValueError):
    """The effective batch does not split evenly over the processes."""


def per_process_batch(per_device: int, accumulation: int, processes: int) -> tuple[int, int]:
    """(micro-batch, accumulation steps) per process that keep the effective batch; see the module text."""
    effective = per_device * accumulation
    if processes <= 1:
        return per_device, accumulation
    if effective % processes:
        raise BatchSplitError(
            f"per_device_train_batch_size x gradient_accumulation_steps = {per_device} x {accumulation} = "
            f"{effective} examples per optimizer step do not split evenly over {processes} GPUs; "
            f"make it a multiple of {processes}"
        )
    share = effective // processes
    accumulation_steps = next(g for g in range(1, share + 1) if share % g == 0 and share // g <= per_device)
    return share // accumulation_steps, accumulation_steps


def optimizer_steps(
    train_rows: int,
    per_device_batch: int,
    accumulation: int,
    epochs: float,
    max_steps: int,
    processes: int = 1,
    drop_last: bool = False,
) -> int:
    """Optimizer steps HF Trainer takes: max_steps when set, else epochs x ceil(batches / accumulation)."""
    if max_steps and max_steps > 0:
        return int(max_steps)
    rows_per_batch = per_device_batch * processes
    batches = train_rows // rows_per_batch if drop_last else math.ceil(train_rows / rows_per_batch)
    per_epoch = max(math.ceil(batches / accumulation), 1)
    return int(math.ceil(epochs * per_epoch))


def adalora_schedule_problem(adalora: dict, total_step: int) -> str | None:
    """Why an AdaLoRA schedule over `total_step` steps never prunes a rank, or None when it does."""
    tinit, tfinal = adalora["tinit"], adalora["tfinal"]
    if tinit < total_step - tfinal:
        return None
    return (
        f"the schedule has no budgeting phase: tinit ({tinit}) >= total_step ({total_step}) - tfinal ({tfinal}) "
        f"= {total_step - tfinal}, so no rank is ever pruned and AdaLoRA trains as plain LoRA; "
        "lower adalora.tinit or adalora.tfinal, or train for more steps"
    )


def smoke_adalora_schedule(steps: int) -> dict:
    """An AdaLoRA schedule laid over a smoke run's few steps, keeping all three phases.

    The config's tinit/tfinal (hundreds of steps) would leave a 3-step smoke run
    no budgeting phase. Over `steps` steps: warm-up for the first quarter, the
    final (fixed-rank) phase for the last quarter but at least one step, and a
    mask after every step in between; e.g. 3 steps: 0 warm-up, 1 budgeting, 1 final.
    """
    return {"tinit": steps // 4, "tfinal": max(1, steps // 4) if steps >= 2 else 0, "deltaT": 1}
