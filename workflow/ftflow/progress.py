"""A training job's progress in its log, without TensorBoard.

One line at the first optimizer step, then at most one every `every_seconds`
of wall time, and one at the last step, so a long job's log grows at a
steady rate whatever its step time:

    progress: step 120/480 (25%), loss 0.8123, 912 tokens/s (301 labelled), elapsed 4m10s, ETA 12m30s

The loss is the last one the Trainer logged (every `logging_steps`); the rates
count this run's tokens only (a resumed run does not redo the steps before its
checkpoint), and the ETA assumes the remaining steps take as long as this
run's steps so far did.
"""

from __future__ import annotations

import logging
import time

from transformers import TrainerCallback

log = logging.getLogger("ftflow.progress")

EVERY_SECONDS = 30.0


def duration_text(seconds: float) -> str:
    """`45s`, `4m10s`, `2h05m`: short and unambiguous in a log line."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(
    step: int,
    max_steps: int,
    loss: tuple[int, float] | None,
    tokens: int,
    label_tokens: int,
    elapsed: float,
    steps_done: int,
) -> str:
    """The log line for `step` of `max_steps`, `steps_done` of them (and `tokens`) in this run's `elapsed` seconds;
    `loss` is (its step, its value) as the Trainer last logged it."""
    parts = [f"step {step}/{max_steps} ({100 * step / max_steps:.0f}%)" if max_steps > 0 else f"step {step}"]
    if loss is None:
        parts.append("loss not logged yet")
    else:
        parts.append(f"loss {loss[1]:.4f}" + ("" if loss[0] == step else f" (at step {loss[0]})"))
    if elapsed > 0:
        parts.append(f"{tokens / elapsed:.0f} tokens/s ({label_tokens / elapsed:.0f} labelled)")
    parts.append(f"elapsed {duration_text(elapsed)}")
    if steps_done > 0 and max_steps > 0:
        parts.append(f"ETA {duration_text(elapsed / steps_done * max(0, max_steps - step))}")
    return "progress: " + ", ".join(parts)


class ProgressLog(TrainerCallback):
    """Logs progress_line at the first step, every `every_seconds`, and at the last step (main process only).

    A step whose loss the Trainer is about to log (every `logging_steps`) gets its line from
    on_log, with that loss; any other step's line, from on_step_end, shows the last loss logged.
    """

    def __init__(self, trainer, every_seconds: float = EVERY_SECONDS, clock=time.monotonic):
        self.trainer = trainer  # FtflowTrainer: its tokens_seen / label_tokens_seen counters
        self.every_seconds = every_seconds
        self.clock = clock
        self.started = 0.0
        self.last_line: float | None = None
        self.pending: tuple | None = None  # (state, when) of a due line waiting for this step's loss
        self.first_step = 0
        self.tokens_before = self.label_tokens_before = 0
        self.lines: list[str] = []

    def on_train_begin(self, args, state, control, **kwargs):
        # after a resume the Trainer has restored global_step and the counters: this run starts there
        self.started = self.clock()
        self.last_line, self.pending = None, None
        self.first_step = state.global_step
        self.tokens_before, self.label_tokens_before = self.trainer.tokens_seen, self.trainer.label_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        now = self.clock()
        last = state.global_step >= state.max_steps
        if not (self.last_line is None or last or now - self.last_line >= self.every_seconds):
            return
        self.last_line = now
        every = int(getattr(state, "logging_steps", 0) or 0)
        if args.logging_strategy == "steps" and every > 0:  # a str enum: equal to its value
            if state.global_step % every == 0:
                self.pending = (state, now)  # on_log follows with this step's loss
                return
        self.write(state, now)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.pending is not None and "loss" in (logs or {}):
            self.write(*self.pending)
            self.pending = None

    def on_train_end(self, args, state, control, **kwargs):
        if self.pending is not None:  # the Trainer did not log the loss after all
            self.write(*self.pending)
            self.pending = None

    def write(self, state, now: float) -> None:
        losses = [(entry.get("step", 0), entry["loss"]) for entry in state.log_history if "loss" in entry]
        line = progress_line(
            state.global_step,
            state.max_steps,
            losses[-1] if losses else None,
            self.trainer.tokens_seen - self.tokens_before,
            self.trainer.label_tokens_seen - self.label_tokens_before,
            now - self.started,
            state.global_step - self.first_step,
        )
        self.lines.append(line)
        log.info("%s", line)
