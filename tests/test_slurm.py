"""The smoke workflow through a real SLURM cluster: `snakemake --profile profiles/slurm`.

tests/cluster/slurm_up.sh brings up one node on loopback (munged, slurmctld,
slurmd from Debian's packages) from a folder this test owns; the daemons are
stopped by PID at the end, whatever happened. snakemake-executor-plugin-slurm
submits every job with sbatch. tests/configs/slurm.yaml has one experiment
that must finish (its train job asks SLURM for one of the node's two fake GPUs)
and one whose tokenize job fails on the cluster and must be reported failed.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time

import pytest

from helpers import REPO, copy_config, snakemake

pytestmark = pytest.mark.cluster

CLUSTER = REPO / "tests" / "cluster"
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
TOOLS = ["munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel"]
# One test cluster per machine at a time: it owns /etc/slurm/slurm.conf.
MACHINE_LOCK = "/tmp/ftflow-slurm-test.lock"
# Without slurmdbd, sacct cannot answer; poll squeue, and early (the plugin waits 40 s by default).
STATUS_ARGS = ["--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "3"]
# The node is this machine (2 CPUs in CI): every job asks for one CPU and little memory.
SMALL_JOBS = [
    "--set-threads",
    "prepare_model=1",
    "tokenize=1",
    "train=1",
    "merge=1",
    "evaluate=1",
    "report=1",
    "--set-resources",
    *(f"{rule}:mem_mb=1500" for rule in ("prepare_model", "tokenize", "train", "merge", "evaluate", "report")),
]


def install_slurm_or_skip() -> None:
    """Install the Debian packages where they are missing and installable; skip only where they are not."""
    if all(shutil.which(tool) for tool in TOOLS):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(
            f"SLURM is not installed and cannot be installed here (needs root and apt-get): apt-get install -y {' '.join(PACKAGES)}"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            pytest.skip(f"SLURM packages could not be installed ({' '.join(command)}): {proc.stderr.strip()[-500:]}")


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    install_slurm_or_skip()
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs slurmd, which needs root")
    with open(MACHINE_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits for another run's cluster test to finish
        state = tmp_path_factory.mktemp("slurm")
        started = time.monotonic()
        up = subprocess.run([str(CLUSTER / "slurm_up.sh"), str(state)], capture_output=True, text=True, timeout=120)
        bring_up_seconds = time.monotonic() - started
        try:
            if up.returncode == 2:
                pytest.skip(f"no test cluster here: {up.stderr.strip()}")
            assert up.returncode == 0 and "ready" in up.stdout, f"slurm_up.sh failed:\n{up.stdout}\n{up.stderr}"
            yield {"state": state, "bring_up_seconds": bring_up_seconds}
        finally:
            subprocess.run([str(CLUSTER / "slurm_down.sh"), str(state)], timeout=120)


def job_states() -> dict[str, str]:
    """{rule and wildcards (the plugin's job comment): SLURM state} of every job the cluster remembers."""
    listing = subprocess.run(
        ["squeue", "-h", "-t", "all", "-o", "%k|%T"], capture_output=True, text=True, check=True
    ).stdout
    return dict(line.split("|", 1) for line in listing.splitlines() if line.startswith("rule_"))


def test_smoke_workflow_on_slurm(slurm_cluster, workdir):
    copy_config(REPO / "tests" / "configs" / "slurm.yaml", workdir)
    (workdir / "broken.jsonl").write_text("this line is not JSON\n")

    started = time.monotonic()
    run = snakemake(
        workdir,
        "--profile",
        str(REPO / "profiles" / "slurm"),
        "--default-resources",
        "slurm_partition=debug",
        "--slurm-no-account",
        "--latency-wait",
        "5",
        *STATUS_ARGS,
        *SMALL_JOBS,
        check=False,
        timeout=900,  # a hang fails the test instead of stalling CI
    )
    wall = time.monotonic() - started
    output = run.stdout + run.stderr
    states = job_states()
    summary = {
        "bring_up_seconds": round(slurm_cluster["bring_up_seconds"], 1),
        "workflow_seconds": round(wall, 1),
        "job_states": states,
    }
    (workdir / "slurm_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))

    # The failing job is reported failed, by SLURM and by Snakemake, and fails the run.
    broken = [name for name in states if name.startswith("rule_tokenize_wildcards_broken-")]
    assert len(broken) == 1 and states[broken[0]] == "FAILED", states
    assert run.returncode != 0
    assert "SLURM status is: 'FAILED'" in output and "Error in rule tokenize" in output, output[-4000:]
    # Every job of the good experiment ran on the cluster and completed (--keep-going).
    expected = {
        "rule_prepare_model_wildcards_smol.smoke",
        "rule_train_wildcards_lora_train",
        "rule_merge_wildcards_lora_train",
        "rule_evaluate_wildcards_lora",
    }
    assert expected <= set(states), states
    assert all(states[name] == "COMPLETED" for name in states if name not in broken), states
    train = json.loads((workdir / "results/lora/train/train_metrics.json").read_text())
    evaluation = json.loads((workdir / "results/lora/eval/metrics.json").read_text())
    assert train["status"] == "ok" and evaluation["status"] == "ok"
    # The train job asked for a GPU (gpus: 1 -> sbatch --gpus=1); SLURM chose the device and ftflow used it.
    train_log = (workdir / "logs/lora/train/train.log").read_text()
    assert "GPU(s) 0 assigned by SLURM job" in train_log, train_log[-2000:]
    assert not (workdir / "results/broken").joinpath("train", "train_metrics.json").exists()
