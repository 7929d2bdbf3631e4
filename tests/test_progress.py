"""The training job's progress lines (ftflow/progress.py): their cadence and what they say.

The lines of a real training job are checked in tests/test_workflow.py (the smoke run's train.log).
"""

from __future__ import annotations

import logging

import pytest

from ftflow.progress import ProgressLog, duration_text, progress_line


def test_duration_text():
    assert [duration_text(s) for s in (0, 44.6, 60, 250, 3600, 7530)] == [
        "0s",
        "45s",
        "1m00s",
        "4m10s",
        "1h00m",
        "2h05m",
    ]


def test_progress_line_says_step_loss_rates_and_eta():
    line = progress_line(120, 480, (120, 0.81234), 91_200, 30_100, 100.0, 100)
    assert line == ("progress: step 120/480 (25%), loss 0.8123, 912 tokens/s (301 labelled), elapsed 1m40s, ETA 6m00s")
    # a resumed run: 100 steps done in this run, since step 20; the loss logged one step earlier
    assert progress_line(120, 480, (119, 0.8), 0, 0, 0.0, 0) == (
        "progress: step 120/480 (25%), loss 0.8000 (at step 119), elapsed 0s"
    )
    assert "loss not logged yet" in progress_line(1, 10, None, 10, 5, 2.0, 1)


class Counters:
    """The two counters ProgressLog reads from FtflowTrainer."""

    tokens_seen = 0
    label_tokens_seen = 0


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drive(steps: int, seconds_per_step: float, logging_steps: int, every: float, start_step: int = 0):
    """Run ProgressLog through `steps` steps as the Trainer calls it: on_step_end, then on_log when it logs."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir="unused", logging_steps=logging_steps, report_to="none", use_cpu=True)
    state = TrainerState(max_steps=steps, global_step=start_step, logging_steps=logging_steps)
    trainer, clock = Counters(), Clock()
    progress = ProgressLog(trainer, every_seconds=every, clock=clock)
    control = TrainerControl()
    progress.on_train_begin(args, state, control)
    while state.global_step < steps:
        clock.now += seconds_per_step
        state.global_step += 1
        trainer.tokens_seen += 100
        trainer.label_tokens_seen += 40
        progress.on_step_end(args, state, control)
        if state.global_step % logging_steps == 0:
            logs = {"loss": 1.0 / state.global_step, "step": state.global_step}
            state.log_history.append(logs)
            progress.on_log(args, state, control, logs=logs)
    progress.on_train_end(args, state, control)
    return progress.lines


@pytest.mark.parametrize("logging_steps", [1, 4])
def test_first_step_then_every_interval_then_the_last(logging_steps, caplog):
    with caplog.at_level(logging.INFO, logger="ftflow.progress"):
        lines = drive(steps=10, seconds_per_step=7.0, logging_steps=logging_steps, every=30.0)
    # step 1 at 7 s; then the first step at least 30 s later (6, at 42 s); then the last
    assert [line.split(",")[0] for line in lines] == [
        "progress: step 1/10 (10%)",
        "progress: step 6/10 (60%)",
        "progress: step 10/10 (100%)",
    ]
    assert caplog.messages == lines
    assert "14 tokens/s (6 labelled)" in lines[0] and "ETA 28s" in lines[1] and "ETA 0s" in lines[2]
    if logging_steps == 1:  # the step's own loss, from on_log
        assert "loss 0.1667," in lines[1] and "loss 0.1000," in lines[2]
    else:  # between two logged steps: the last logged loss, and its step
        assert "loss not logged yet" in lines[0] and "loss 0.2500 (at step 4)" in lines[1]


def test_a_resumed_run_counts_its_own_steps_for_the_eta():
    lines = drive(steps=10, seconds_per_step=5.0, logging_steps=1, every=0.0, start_step=6)
    assert lines[0].startswith("progress: step 7/10 (70%)") and lines[0].endswith("elapsed 5s, ETA 15s")
    assert len(lines) == 4  # every step when the interval is 0
