"""The GPU slot allocator: distinct devices for concurrent jobs, slots back from killed jobs.

N GPUs are simulated with FTFLOW_GPUS=N; the jobs are real processes taking
real flock locks in a slots folder of the test's own, so no CUDA is needed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ftflow.gpu_slots import GpuSlotError, acquire_gpus, gpus_for_job, machine_gpus
from ftflow.launch import BatchSplitError, data_parallel_training_values, per_process_batch
from ftflow.workflow import heavy_threads
from helpers import REPO, copy_config, dry_run_jobs, snakemake

# One job: take `count` slots, record when it held which devices, hold them `hold` seconds.
JOB = textwrap.dedent(
    """
    import json, os, sys, time
    from ftflow.gpu_slots import gpus_for_job
    count, hold, record = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    with gpus_for_job(count, f"job {os.getpid()}", poll_seconds=0.05) as slots:
        start = time.monotonic()
        print("holding", os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
        time.sleep(hold)
        end = time.monotonic()
    with open(record, "w") as out:
        json.dump({"devices": slots.devices, "visible": os.environ["CUDA_VISIBLE_DEVICES"], "start": start, "end": end}, out)
    """
)


def slot_env(tmp_path: Path, gpus: str) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO / "workflow"),
        "FTFLOW_GPUS": gpus,
        "FTFLOW_GPU_SLOTS_DIR": str(tmp_path / "slots"),
    }


def start_job(tmp_path: Path, env: dict, count: int, hold: float, name: str) -> tuple[subprocess.Popen, Path]:
    record = tmp_path / f"{name}.json"
    proc = subprocess.Popen(
        [sys.executable, "-c", JOB, str(count), str(hold), str(record)], env=env, stdout=subprocess.PIPE, text=True
    )
    return proc, record


def test_machine_gpus_sources(tmp_path):
    assert machine_gpus({"FTFLOW_GPUS": "3"}) == (["0", "1", "2"], "FTFLOW_GPUS")
    assert machine_gpus({"FTFLOW_GPUS": "1,3", "CUDA_VISIBLE_DEVICES": "0"})[0] == ["1", "3"]
    assert machine_gpus({"CUDA_VISIBLE_DEVICES": "2,5"})[0] == ["2", "5"]
    assert machine_gpus({"CUDA_VISIBLE_DEVICES": ""})[0] == []
    assert machine_gpus({"CUDA_VISIBLE_DEVICES": "-1"})[0] == []
    assert machine_gpus({"PATH": str(tmp_path)}) == ([], "no nvidia-smi on PATH")
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-a)'\necho 'GPU 1: NVIDIA H100 (UUID: GPU-b)'\n")
    fake.chmod(0o755)
    assert machine_gpus({"PATH": str(tmp_path)}) == (["0", "1"], "nvidia-smi -L")


def test_concurrent_jobs_get_distinct_gpus(tmp_path):
    """Eight one-GPU jobs and two two-GPU jobs on 3 GPUs: no device is ever held by two jobs at once."""
    env = slot_env(tmp_path, "3")
    jobs = [start_job(tmp_path, env, 1, 0.4, f"one{i}") for i in range(8)]
    jobs += [start_job(tmp_path, env, 2, 0.4, f"two{i}") for i in range(2)]
    for proc, _ in jobs:
        assert proc.wait(timeout=120) == 0
    records = [json.loads(record.read_text()) for _, record in jobs]
    for rec in records:
        assert rec["visible"] == ",".join(rec["devices"])
        assert len(set(rec["devices"])) == len(rec["devices"])
        assert set(rec["devices"]) <= {"0", "1", "2"}
    assert sorted(len(r["devices"]) for r in records) == [1] * 8 + [2] * 2
    for i, a in enumerate(records):
        for b in records[i + 1 :]:
            overlap = a["start"] < b["end"] and b["start"] < a["end"]
            if overlap:
                assert not set(a["devices"]) & set(b["devices"]), (a, b)
    # 3 GPUs and 12 GPU-holds of 0.4 s: the jobs really ran side by side.
    assert any(a["start"] < b["end"] and b["start"] < a["end"] for i, a in enumerate(records) for b in records[i + 1 :])


def test_slots_of_a_killed_job_free_themselves(tmp_path):
    env = slot_env(tmp_path, "2")
    proc, _ = start_job(tmp_path, env, 2, 600, "hog")
    assert proc.stdout.readline().split() == ["holding", "0,1"]
    with pytest.raises(GpuSlotError, match="no 1 free GPU slot"):
        acquire_gpus(1, "test job", env=env, wait_seconds=0)
    holder = (tmp_path / "slots" / "gpu-0.lock").read_text()
    assert f"pid {proc.pid}" in holder

    os.kill(proc.pid, signal.SIGKILL)  # no handler, no cleanup: only the kernel releases the locks
    proc.wait(timeout=30)
    started = time.monotonic()
    with acquire_gpus(2, "after the kill", env=env, wait_seconds=10, poll_seconds=0.05) as slots:
        assert slots.devices == ["0", "1"]
    assert time.monotonic() - started < 5


def test_waiting_job_starts_when_a_slot_frees(tmp_path):
    env = slot_env(tmp_path, "1")
    first, first_record = start_job(tmp_path, env, 1, 1.0, "first")
    assert first.stdout.readline().startswith("holding")
    second, second_record = start_job(tmp_path, env, 1, 0.0, "second")
    assert first.wait(timeout=60) == 0 and second.wait(timeout=60) == 0
    a, b = json.loads(first_record.read_text()), json.loads(second_record.read_text())
    assert b["start"] >= a["end"]


def test_too_many_gpus_is_a_clear_error(tmp_path):
    env = slot_env(tmp_path, "2")
    with pytest.raises(
        GpuSlotError, match=r"experiment 'x', stage 'sft' \(gpus: 4\): asks for 4 GPU\(s\) but this machine has 2"
    ):
        acquire_gpus(4, "experiment 'x', stage 'sft' (gpus: 4)", env=env)
    no_gpu = {"PATH": str(tmp_path), "FTFLOW_GPU_SLOTS_DIR": str(tmp_path / "slots")}
    with pytest.raises(GpuSlotError, match="has 0 .*no nvidia-smi on PATH"):
        acquire_gpus(1, "eval", env=no_gpu)


def test_cpu_job_sees_no_device_and_slurm_jobs_take_no_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with gpus_for_job(0, "merge") as slots:
        assert slots.devices == [] and os.environ["CUDA_VISIBLE_DEVICES"] == ""
    slurm = {"SLURM_JOB_ID": "42", "CUDA_VISIBLE_DEVICES": "0", "FTFLOW_GPU_SLOTS_DIR": str(tmp_path / "slots")}
    with acquire_gpus(1, "train", env=slurm) as slots:
        assert slots.devices == ["0"] and slots.descriptors == []
    assert not (tmp_path / "slots").exists()


@pytest.mark.parametrize(
    ("batch", "accumulation", "processes", "expected"),
    [(8, 1, 2, (4, 1)), (4, 4, 2, (4, 2)), (8, 3, 2, (6, 2)), (2, 4, 2, (2, 2)), (4, 1, 4, (1, 1)), (8, 2, 1, (8, 2))],
)
def test_effective_batch_rule(batch, accumulation, processes, expected):
    assert per_process_batch(batch, accumulation, processes) == expected


def test_effective_batch_rule_holds_everywhere():
    for batch in range(1, 17):
        for accumulation in range(1, 9):
            for processes in range(1, 9):
                try:
                    micro, steps = per_process_batch(batch, accumulation, processes)
                except BatchSplitError:
                    assert (batch * accumulation) % processes
                    continue
                assert micro * steps * processes == batch * accumulation
                assert micro <= batch
    with pytest.raises(BatchSplitError, match="6 examples per optimizer step do not split evenly over 4 GPUs"):
        per_process_batch(3, 2, 4)
    values = data_parallel_training_values({"per_device_train_batch_size": 8, "learning_rate": 1e-3}, 2)
    assert values == {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 1e-3}


def test_heavy_jobs_share_a_cpu_machine_two_at_a_time():
    # CPU only, several experiments: two train/eval jobs side by side, the cores split between them
    assert heavy_threads(2, experiments=4, gpus=0) == 1
    assert heavy_threads(16, experiments=4, gpus=0) == 8
    assert heavy_threads(3, experiments=9, gpus=0) == 1
    # one experiment, one core, a GPU machine: every core for each job, as before
    assert heavy_threads(2, experiments=1, gpus=0) == 2
    assert heavy_threads(1, experiments=4, gpus=0) == 1
    assert heavy_threads(16, experiments=4, gpus=1) == 16
    assert heavy_threads(None, experiments=4, gpus=0) == 1


def test_gpu_box_profile_offers_the_gpus_the_allocator_sees(monkeypatch):
    from snakemake.profiles import ProfileConfigFileParser

    monkeypatch.setenv("FTFLOW_GPUS", "3")
    with open(REPO / "profiles" / "gpu-box" / "config.yaml") as stream:
        profile = ProfileConfigFileParser().parse(stream)
    assert profile["resources"] == ["gpu=3"]
    assert profile["cores"] == "all" and profile["apptainer-args"] == "--nv"
    assert profile["rerun-incomplete"] == profile["keep-going"] == "True"


def gpus_asked(dry_run_output: str) -> dict[str, int]:
    """{"rule wildcards": gpu resource} of the jobs a dry run lists."""
    return {
        f"{job.rule} {job.wildcards}": int(job.resources["gpu"])
        for job in dry_run_jobs(dry_run_output)
        if "gpu" in job.resources
    }


@pytest.mark.workflow
def test_rules_ask_for_gpus(workdir):
    """Train asks for its stage's gpus:, eval for one GPU where there is one, merge for none."""
    copy_config(REPO / "tests" / "configs" / "ddp.yaml", workdir)
    asked = gpus_asked(snakemake(workdir, "-n", env={"FTFLOW_GPUS": "4"}).stdout)
    assert asked["train experiment=single, stage=train"] == 1
    assert asked["train experiment=ddp, stage=train"] == 2
    assert asked["merge experiment=ddp, stage=train"] == 0
    assert asked["evaluate experiment=ddp"] == 1 and asked["evaluate experiment=baseline"] == 1
    # No GPU visible: the baseline (no stage says gpus:) evaluates on the CPU; declared stages keep theirs.
    cpu_only = gpus_asked(snakemake(workdir, "-n", env={"CUDA_VISIBLE_DEVICES": ""}).stdout)
    assert cpu_only["evaluate experiment=baseline"] == 0 and cpu_only["train experiment=ddp, stage=train"] == 2
