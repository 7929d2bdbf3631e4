"""Resuming a killed train job: which checkpoint to continue from, and a TensorBoard log that continues too.

A checkpoint is complete once its trainer_state.json is whole (the Trainer
writes it last); ftflow's own progress (PROGRESS_FILE: token counts; AdaLoRA's
rank schedule, adalora.py) is written into the folder before it. A re-run of
a killed job resumes from the newest complete checkpoint of the same stage
config, identified by the stamp in the checkpoints folder: the Trainer
restores weights, optimizer, scheduler, RNG and data position; the divergence
guard rebuilds its starting loss from the restored log; TensorBoard purges the
steps the killed run logged after that checkpoint, so the curve continues
instead of doubling back. Any other stamp (an edited stage, another base)
means the checkpoints are stale: they and the old event files are removed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass

from . import adalora
from .atomic import read_json, write_json
from .hashing import content_hash
from .specs import ExperimentSpec, StageSpec

STAGE_STAMP = "ftflow_stage.json"  # in the checkpoints folder: the stage config its checkpoints belong to
PROGRESS_FILE = "ftflow_progress.json"  # in each checkpoint: ftflow's counters at that step


@dataclass(frozen=True)
class Resume:
    """Where a run starts: a checkpoint folder and its step, or nothing (step 0)."""

    checkpoint: str | None
    step: int


def stage_stamp(experiment: ExperimentSpec, stage: StageSpec, base_dir: str, adapter_dir: str | None) -> dict:
    """What a checkpoint must have been trained with to be continued: the stage config, model and inputs."""
    fingerprint = content_hash({"stage": asdict(stage), "model": experiment.model, "smoke": experiment.smoke})
    return {
        "config_hash": fingerprint,
        "base": os.path.abspath(base_dir),
        "adapter": adapter_dir and os.path.abspath(adapter_dir),
    }


def find_resume(checkpoints_dir: str, tb_dir: str, stamp: dict, needs_adalora_state: bool, is_main: bool) -> Resume:
    """The checkpoint to continue from; rank 0 also clears stale checkpoints and event files and stamps the folder.

    Call it under `args.main_process_first`, so the other data-parallel
    processes look only once rank 0 has cleaned up and find the same checkpoint.
    """
    checkpoint = last_checkpoint(checkpoints_dir, stamp, needs_adalora_state)
    if is_main:
        if checkpoint is None and os.path.isdir(tb_dir):
            shutil.rmtree(tb_dir)
        os.makedirs(checkpoints_dir, exist_ok=True)
        write_json(os.path.join(checkpoints_dir, STAGE_STAMP), stamp)
    return Resume(checkpoint, int(os.path.basename(checkpoint).split("-")[1]) if checkpoint else 0)


def last_checkpoint(folder: str, stamp: dict, needs_adalora_state: bool) -> str | None:
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
        if entry.startswith("checkpoint-") and step.isdigit() and checkpoint_complete(path, needs_adalora_state):
            candidates.append((int(step), path))
    return max(candidates)[1] if candidates else None


def checkpoint_complete(path: str, needs_adalora_state: bool) -> bool:
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as handle:
            json.load(handle)  # a kill mid-write leaves it truncated
    except (OSError, ValueError):
        return False
    if not os.path.exists(os.path.join(path, PROGRESS_FILE)):
        return False
    return adalora.checkpoint_has_state(path) or not needs_adalora_state


def tensorboard_writer(tb_dir: str, resume: Resume):
    """A SummaryWriter that continues the stage's curve: on resume it purges the steps after the checkpoint."""
    from torch.utils.tensorboard import SummaryWriter

    if resume.checkpoint:
        wait_for_later_event_file_name(tb_dir)
    # purge_step: TensorBoard drops what the killed run logged after the checkpoint (steps > resume.step).
    return SummaryWriter(log_dir=tb_dir, purge_step=resume.step + 1 if resume.checkpoint else None)


def wait_for_later_event_file_name(tb_dir: str) -> None:
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
