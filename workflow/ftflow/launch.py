"""Data-parallel training: how a stage with `gpus: k > 1` runs on k devices.

`ftflow train --gpus k` holds k GPU slots (gpu_slots.py) and starts k
training processes with torchrun, one per device, that run the same
`ftflow train` command; HF Trainer sees torchrun's RANK/WORLD_SIZE and trains
with DistributedDataParallel (NCCL on GPUs, gloo on the CPU).

The effective batch rule. A stage's config says what one optimizer step
sees, whatever the number of devices:

    effective batch = per_device_train_batch_size x gradient_accumulation_steps

With k processes each process takes effective batch / k examples per
optimizer step (the effective batch must split evenly, which the config check
enforces before any job starts), in as few micro-batches as keep each
micro-batch at or below the configured per_device_train_batch_size (the
memory the config was sized for). Examples, written as batch x accumulation:
8x1 on 2 GPUs runs 4x1 per GPU; 4x4 on 2 GPUs runs 4x2; 8x3 on 2 GPUs runs
6x2. The loss, learning-rate schedule and step count of a stage therefore
match its single-device run (up to float summation order).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

from .gpu_slots import GpuSlots
from .schedule import BatchSplitError, per_process_batch  # noqa: F401  (BatchSplitError: raised through here)

log = logging.getLogger("ftflow.launch")


def data_parallel_training_values(training: dict, processes: int) -> dict:
    """The stage's TrainingArguments values for one of `processes` data-parallel workers."""
    if processes <= 1:
        return training
    per_device, accumulation = per_process_batch(
        int(training.get("per_device_train_batch_size", 8)),
        int(training.get("gradient_accumulation_steps", 1)),
        processes,
    )
    return {**training, "per_device_train_batch_size": per_device, "gradient_accumulation_steps": accumulation}


def torchrun_command(processes: int, argv: list[str]) -> list[str]:
    """One `ftflow <argv>` process per device on this machine.

    --standalone lets torchrun pick a free rendezvous port on localhost, so
    several data-parallel jobs can run side by side on one box.
    """
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={processes}",
        "-m",
        "ftflow",
        *argv,
    ]


def is_data_parallel_worker() -> bool:
    """True inside a process torchrun started (it sets LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ


def run_data_parallel(processes: int, argv: list[str], slots: GpuSlots) -> int:
    """Run the torchrun workers in the foreground and return their exit status.

    torchrun inherits the slot locks' descriptors, so the GPUs stay held as
    long as the workers' launcher lives, even if this process is killed first.
    SIGTERM and SIGINT (a cancelled Snakemake or SLURM job) are passed on.
    """
    command = torchrun_command(processes, argv)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": slots.visible_devices}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    log.info("data-parallel over %d process(es), devices %r: %s", processes, slots.visible_devices, " ".join(command))
    child = subprocess.Popen(command, env=env, pass_fds=tuple(slots.descriptors))

    def forward(signum, _frame):
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
