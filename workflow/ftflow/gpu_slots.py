"""GPU slots: which GPUs of a scheduler-less machine one job may use.

`snakemake --resources gpu=N` caps how many GPUs the running jobs ask for in
total, but Snakemake does not say *which* devices a job gets: two jobs asking
for one GPU each would both start on device 0. ftflow hands out device ids
itself. The slots folder holds one lock file per GPU (`gpu-<id>.lock`); a job
holds an exclusive `flock` on each of its slots for as long as it lives and
runs with `CUDA_VISIBLE_DEVICES` set to exactly those devices. The kernel
drops a lock when the last file descriptor on it closes, so a slot frees
itself however its job ends: normal exit, exception, SIGKILL, out-of-memory
kill. Nothing has to clean up after a crash.

How many GPUs the machine has, first match wins:
  FTFLOW_GPUS            a count ("4") or a list of device ids ("0,2,3");
                         the tests simulate N GPUs with it
  CUDA_VISIBLE_DEVICES   when set, the devices this machine lets jobs use
  nvidia-smi -L          one line per GPU
  otherwise              none

The slots folder is FTFLOW_GPU_SLOTS_DIR, else `ftflow-gpu-slots` in the
system temp folder (Apptainer binds /tmp into containers, so jobs inside and
outside containers share it). Under SLURM the scheduler has already given the
job its devices (and may renumber them from 0 in every job), so no lock is
taken there: the job only checks it sees as many GPUs as it asked for.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from .errors import FtflowError

log = logging.getLogger("ftflow.gpu_slots")

SLOT_FILE = "gpu-{}.lock"


class GpuSlotError(FtflowError):
    """A job asks for more GPUs than the machine has, or none could be had in time."""


def machine_gpus(env: dict | None = None) -> tuple[list[str], str]:
    """The device ids jobs on this machine may use, and where that answer came from."""
    env = os.environ if env is None else env
    declared = env.get("FTFLOW_GPUS")
    if declared is not None and declared.strip() != "":
        declared = declared.strip()
        if declared.isdigit():
            return [str(i) for i in range(int(declared))], "FTFLOW_GPUS"
        return [d.strip() for d in declared.split(",") if d.strip()], "FTFLOW_GPUS"
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        # "" and "-1" are CUDA's ways of saying "no device".
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"], "CUDA_VISIBLE_DEVICES"
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    if smi:
        try:
            listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
        except (subprocess.SubprocessError, OSError) as err:
            log.warning("nvidia-smi -L failed (%s); assuming no GPU", err)
            return [], "nvidia-smi -L (failed)"
        count = sum(1 for line in listing.splitlines() if line.startswith("GPU "))
        return [str(i) for i in range(count)], "nvidia-smi -L"
    return [], "no nvidia-smi on PATH"


def slots_folder(env: dict | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("FTFLOW_GPU_SLOTS_DIR") or os.path.join(tempfile.gettempdir(), "ftflow-gpu-slots")


@dataclass
class GpuSlots:
    """The devices one job holds; the locks live as long as `descriptors` stay open."""

    devices: list[str]
    descriptors: list[int] = field(default_factory=list)

    @property
    def visible_devices(self) -> str:
        return ",".join(self.devices)

    def release(self) -> None:
        for fd in self.descriptors:
            os.close(fd)  # closing the last descriptor drops the flock
        self.descriptors = []

    def __enter__(self) -> "GpuSlots":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _try_lock(folder: str, device: str, holder: str) -> int | None:
    path = os.path.join(folder, SLOT_FILE.format(device))
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        os.fchmod(fd, 0o666)  # past the umask: other users' jobs open the same slot files
    except PermissionError:
        pass  # someone else's file, already shared
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    # For people looking at the folder: who holds the slot. The lock, not this text, is the truth.
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{holder}\n".encode(), 0)
    return fd


def acquire_gpus(
    count: int,
    who: str,
    *,
    env: dict | None = None,
    wait_seconds: float | None = None,
    poll_seconds: float = 2.0,
) -> GpuSlots:
    """Lock `count` distinct GPUs of this machine for the calling process.

    All-or-nothing: a job that cannot get every slot it needs releases the ones
    it got and tries again after `poll_seconds`, so two jobs each holding half
    of what the other needs never deadlock. `wait_seconds=None` waits as long
    as it takes (Snakemake's gpu resource normally keeps the wait short);
    `who` names the job in errors and in the lock files.
    """
    env = os.environ if env is None else env
    if count < 0:
        raise GpuSlotError(f"{who}: gpus must be 0 or more, got {count}")
    if count == 0:
        return GpuSlots(devices=[])
    devices, source = machine_gpus(env)
    if count > len(devices):
        raise GpuSlotError(
            f"{who}: asks for {count} GPU(s) but this machine has {len(devices)} (from {source}); "
            "lower the stage's `gpus:` or run it where more GPUs are (set FTFLOW_GPUS to override the count)"
        )
    if env.get("SLURM_JOB_ID"):
        # The scheduler chose the devices and constrains the job to them.
        log.info("%s: GPU(s) %s assigned by SLURM job %s", who, ",".join(devices[:count]), env["SLURM_JOB_ID"])
        return GpuSlots(devices=devices[:count])
    folder = slots_folder(env)
    os.makedirs(folder, exist_ok=True)
    try:
        os.chmod(folder, 0o1777)  # shared by every user's jobs on the machine, like /tmp
    except PermissionError:
        pass
    holder = f"pid {os.getpid()} on {os.uname().nodename}: {who}"
    started = time.monotonic()
    announced = False
    while True:
        held: list[tuple[str, int]] = []
        for device in devices:
            fd = _try_lock(folder, device, holder)
            if fd is not None:
                held.append((device, fd))
                if len(held) == count:
                    log.info("%s: GPU slot(s) %s from %s", who, ",".join(d for d, _ in held), folder)
                    return GpuSlots(devices=[d for d, _ in held], descriptors=[fd for _, fd in held])
        for _, fd in held:
            os.close(fd)
        waited = time.monotonic() - started
        if wait_seconds is not None and waited >= wait_seconds:
            raise GpuSlotError(
                f"{who}: no {count} free GPU slot(s) among {len(devices)} in {folder} after {waited:.0f} s; "
                "other jobs hold them (see the holder written in each gpu-*.lock)"
            )
        if not announced:
            log.info("%s: waiting for %d free GPU slot(s) in %s", who, count, folder)
            announced = True
        time.sleep(poll_seconds)


@contextmanager
def gpus_for_job(count: int, who: str, poll_seconds: float = 2.0):
    """Hold `count` GPU slots until the block ends and let the process see only those devices.

    A CPU job (count 0) sees no device at all, so it never creates a CUDA
    context on a GPU another job holds. Set before torch touches CUDA.
    """
    slots = acquire_gpus(count, who, poll_seconds=poll_seconds)
    os.environ["CUDA_VISIBLE_DEVICES"] = slots.visible_devices
    try:
        yield slots
    finally:
        slots.release()
