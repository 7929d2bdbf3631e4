"""A workflow killed with SIGKILL at every step, then re-run, ends exactly as an uninterrupted run.

Kill points are seen from the file system, not injected into the code: the
moment a step's temporary output appears (prepare, tokenize, merge, report
are then mid-write), the moment training has written a checkpoint, and the
moment the evaluation log shows the model loaded. After each kill no output
that looks finished may be partial, and the next run must resume (train) or
redo (everything else) the interrupted job.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import BIN, REPO, snakemake, warm_jobs_alive

pytestmark = pytest.mark.workflow

CONFIG = REPO / "tests" / "configs" / "crash.yaml"


def start(workdir: Path) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.Popen(
        [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # its own process group: the kill takes the job with it
    )


def kill_when(proc: subprocess.Popen, seen, timeout: float = 300) -> bool:
    """SIGKILL the whole process group as soon as `seen()` is true; False if the run ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if seen():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("kill point never reached")


def temp_of(folder: Path, name: str):
    return lambda: folder.exists() and any(p.name.startswith(f".tmp-{name}.") for p in folder.iterdir())


def outcome(workdir: Path) -> dict:
    results = workdir / "results"
    train = json.loads((results / "lora" / "train" / "train_metrics.json").read_text())
    evaluation = json.loads((results / "lora" / "eval" / "metrics.json").read_text())
    return {
        "steps": train["steps"],
        "losses": [round(e["loss"], 5) for e in train["losses"]],
        "eval_loss": round(evaluation["eval_loss"], 5),
        "metrics": evaluation["metrics"],
        "predictions": (results / "lora" / "eval" / "predictions.jsonl").read_text(),
        "summary_rows": (results / "report" / "summary.csv").read_text().count("\n"),
    }


def assert_no_partial_outputs(workdir: Path) -> None:
    results = workdir / "results"
    for folder in [
        results / "models" / "smol.smoke",
        results / "lora" / "train" / "merged",
        results / "lora" / "train" / "adapter",
    ]:
        if folder.exists():
            assert (folder / "config.json").exists() or (folder / "adapter_config.json").exists(), folder
            assert list(folder.glob("*.safetensors")), f"{folder} looks finished but has no weights"
    for metrics in results.rglob("train_metrics.json"):
        assert json.loads(metrics.read_text())["status"] in ("ok", "diverged")
    for path in results.rglob("*.json"):
        json.loads(path.read_text())  # every JSON file that exists is whole


def test_killed_at_every_step_then_rerun_equals_uninterrupted(tmp_path):
    reference = tmp_path / "reference"
    reference.mkdir()
    shutil.copy(CONFIG, reference / "config.yaml")
    snakemake(reference, "--cores", "1")
    expected = outcome(reference)
    assert expected["steps"] == 4

    work = tmp_path / "killed"
    work.mkdir()
    shutil.copy(CONFIG, work / "config.yaml")
    results = work / "results"
    stage = results / "lora" / "train"
    points = {
        "prepare_model writing": temp_of(results / "models", "smol.smoke"),
        "tokenize writing": lambda: (
            (results / "data").exists() and any(p.name.startswith(".tmp-colmap-") for p in (results / "data").iterdir())
        ),
        "train after its second checkpoint": lambda: (
            stage / "checkpoints" / "checkpoint-2" / "trainer_state.json"
        ).exists(),
        "merge writing": temp_of(stage, "merged"),
        "evaluate with the model loaded": lambda: "Loading weights" in _read(work / "logs" / "lora" / "eval.log"),
        "report writing": lambda: (
            (results / "report").exists() and any(p.name.startswith(".tmp-") for p in (results / "report").iterdir())
        ),
    }
    killed = []
    for name, seen in points.items():
        if kill_when(start(work), seen):
            killed.append(name)
            assert not warm_jobs_alive(work / "logs"), f"{name}: a warm-started job outlived its killed run"
            # a killed Snakemake leaves its lock behind, as after a machine stop
            snakemake(work, "--unlock")
        assert_no_partial_outputs(work)
    assert len(killed) >= 5, f"too few kill points reached: {killed}"

    snakemake(work, "--cores", "1")
    resumed = json.loads((stage / "train_metrics.json").read_text())["resumed_from_step"]
    assert resumed >= 2, "training resumed from its checkpoint instead of starting over"
    assert outcome(work) == expected


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
