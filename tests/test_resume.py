"""A training job killed with SIGKILL after a checkpoint resumes from it and ends as if never killed.

The killed run is a real `ftflow train` process; the re-run and the
uninterrupted reference run in this process, with the same thread count.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import BIN, Workspace, raw_config

STEPS = 5
ADALORA = {
    "method": "adalora",
    "adalora": {"init_r": 6, "target_r": 2, "lora_alpha": 8, "lora_dropout": 0.0},
    "training": {"learning_rate": 2.0e-2},
}
LORA = {"method": "lora", "divergence": {"factor": 50.0, "warmup_steps": 2}}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    # two identical experiments per method: one runs through, the other is killed and re-run
    experiments = {"lora-ref": LORA, "lora-killed": LORA, "adalora-ref": ADALORA, "adalora-killed": ADALORA}
    raw = raw_config(experiments, max_steps=STEPS)
    raw["defaults"]["training"]["save_steps"] = 1
    return Workspace(tmp_path_factory.mktemp("resume"), raw)


def complete(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def kill_after_checkpoint(ws: Workspace, experiment: str, step: int) -> None:
    """Start `ftflow train` for the experiment and SIGKILL it once checkpoint-`step` is written."""
    spec = ws.plan.experiments[experiment].stage("train")
    stage = ws.stage_dir(experiment)
    command = [
        str(BIN / "ftflow"), "train",
        "--config", str(ws.results / experiment / "config.json"),
        "--stage", "train",
        "--base", str(ws.base),
        "--data", str(ws.results / "data" / spec.data_id),
        "--out", str(stage),
        "--threads", str(torch.get_num_threads()),
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    target = stage / "checkpoints" / f"checkpoint-{step}"
    deadline = time.time() + 300
    while not complete(target):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before checkpoint-{step}: {proc.stderr.read().decode()[-3000:]}")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("no checkpoint within 300 s")
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (stage / "train_metrics.json").exists(), "the run finished before the kill"


def scalars(tb: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb))  # honours the purge a resumed writer records
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.mark.parametrize("method, kill_at", [("lora", 2), ("adalora", 2)])
def test_killed_run_resumes_and_continues_its_curve(ws, method, kill_at):
    reference = ws.train(f"{method}-ref")
    assert reference["steps"] == STEPS and reference["resumed_from_step"] == 0

    kill_after_checkpoint(ws, f"{method}-killed", kill_at)
    resumed = ws.train(f"{method}-killed")

    assert resumed["status"] == "ok" and resumed["steps"] == STEPS
    assert kill_at <= resumed["resumed_from_step"] < STEPS
    # The curve goes on where it stopped: every step's loss is the uninterrupted run's, to
    # the bit (same machine, same threads). A near miss is a restored state that is off: an
    # AdaLoRA run whose importance averages restarted differed by only 1e-6 relative.
    assert [e["step"] for e in resumed["losses"]] == list(range(1, STEPS + 1))
    expected = [e["loss"] for e in reference["losses"]]
    assert [e["loss"] for e in resumed["losses"]] == expected
    assert resumed["tokens"] == reference["tokens"]
    # TensorBoard shows one curve: the steps the killed run logged past its checkpoint were purged
    tb = scalars(ws.stage_dir(f"{method}-killed") / "tb", "train/loss")
    assert [s for s, _ in tb] == list(range(1, STEPS + 1))
    assert [v for _, v in tb] == pytest.approx(expected, rel=1e-6)  # TensorBoard stores float32
    assert not (ws.stage_dir(f"{method}-killed") / "checkpoints").exists()

    if method == "adalora":
        # pruning went on from the restored importance scores and rank pattern
        assert resumed["adalora"]["final_ranks"] == reference["adalora"]["final_ranks"]
        assert resumed["adalora"]["rank_budget"] == reference["adalora"]["rank_budget"]
        assert len(set(resumed["adalora"]["final_ranks"].values())) > 1


def test_divergence_guard_keeps_its_starting_loss_across_a_resume():
    from ftflow.trainer import DivergenceGuard

    guard = DivergenceGuard(trainer=None, factor=3.0, warmup_steps=2)
    restored = SimpleNamespace(
        global_step=3, log_history=[{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 2.5}]
    )
    guard.on_train_begin(None, restored, None)
    assert guard.start_losses == [1.0, 2.0]
    control = SimpleNamespace(should_training_stop=False, should_save=True)
    guard.on_log(None, SimpleNamespace(global_step=4), control, logs={"loss": 4.4})
    assert guard.reason is None  # 4.4 < 3 x 1.5
    guard.on_log(None, SimpleNamespace(global_step=5), control, logs={"loss": 4.6})
    assert "exceeds 3 x starting loss 1.5" in guard.reason
    assert control.should_training_stop and not control.should_save
