"""Where one training step's time goes, per side: `python -m ftflow.bench.profile_step SIDE METHOD [WORK] [--smoke]`.

SIDE is ftflow or trl, METHOD lora or full, WORK the bench work folder
(default bench/work, prepared by `ftflow bench`; --smoke: the tiny stand-in model). Trains two steps on the same
examples as the peer comparison and profiles the second with torch.profiler
(CPU); prints the operators with the most self CPU time, and writes
WORK/profile-SIDE-METHOD.json with them.
"""

from __future__ import annotations

import os
import sys

from transformers import TrainerCallback


class ProfileStep(TrainerCallback):
    """torch.profiler over optimizer step `step` (1-based), forward, backward and optimizer included."""

    def __init__(self, step: int = 2):
        self.step = step
        self.profiler = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            from torch.profiler import ProfilerActivity, profile

            self.profiler = profile(activities=[ProfilerActivity.CPU])
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is not None and state.global_step == self.step:
            self.profiler.__exit__(None, None, None)

    def top(self, count: int = 15) -> list[dict]:
        events = self.profiler.key_averages()
        total = sum(e.self_cpu_time_total for e in events) or 1
        rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:count]
        return [
            {
                "op": e.key,
                "self_cpu_ms": round(e.self_cpu_time_total / 1000, 1),
                "share": round(e.self_cpu_time_total / total, 3),
                "calls": e.count,
            }
            for e in rows
        ]


def profile(side: str, method: str, work: str, smoke: bool = False) -> dict:
    """Two steps of SIDE's run in the peer comparison, the second profiled."""
    from ..atomic import write_json
    from .inputs import default_configfile, prepare_inputs
    from .peers import peer_stage
    from .train_throughput import run_ftflow_path
    from .trl_side import run_trl_side

    inputs = prepare_inputs(work, default_configfile(), smoke=smoke, cores=os.cpu_count() or 1, merged=False)
    callback = ProfileStep(2)
    common = dict(
        model_dir=inputs.model_dir,
        data_dir=inputs.data_dir,
        stage=peer_stage(inputs.stage),
        method=method,
        steps=2,
        out_dir=os.path.join(inputs.work, "profile"),
        callbacks=(callback,),
    )
    if side == "trl":
        run = run_trl_side(data_spec=inputs.data_spec, workdir=inputs.work, **common)
    elif side == "ftflow":
        run = run_ftflow_path(**common)
    else:
        raise SystemExit(f"unknown side {side!r}: ftflow or trl")
    out = {"side": side, "method": method, "step_seconds": run["step_seconds"], "top_ops": callback.top()}
    write_json(os.path.join(inputs.work, f"profile-{side}-{method}.json"), out)
    return out


if __name__ == "__main__":
    flags = [a for a in sys.argv[1:] if a.startswith("--")]
    side, method, *rest = [a for a in sys.argv[1:] if not a.startswith("--")]
    result = profile(side, method, rest[0] if rest else "bench/work", smoke="--smoke" in flags)
    for row in result["top_ops"]:
        print(f"{row['self_cpu_ms']:10.1f} ms {100 * row['share']:5.1f}% {row['calls']:6d}  {row['op']}")
