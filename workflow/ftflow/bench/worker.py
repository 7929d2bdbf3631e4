"""One timed run in a fresh process: `python -m ftflow.bench.worker task.json result.json`.

A fresh process per run keeps the sides apart: peak RSS (ru_maxrss) is the
run's own, and neither side inherits the other's allocator state, threads or
compiled kernels. The task names a function of this package and its keyword
arguments; the result is what the function returns, plus the process's peak
resident memory.
"""

from __future__ import annotations

import importlib
import os
import resource
import subprocess
import sys
import tempfile

from ..atomic import read_json, write_json
from ..errors import FtflowError

# "module:function" -> a function of ftflow.bench that returns a JSON-able dict
TASKS = {
    "train.baseline": "train_throughput:run_baseline_recipe",
    "train.ftflow": "train_throughput:run_ftflow_path",
    "generate.one_at_a_time": "generation:run_one_at_a_time",
    "generate.batched": "generation:run_batched",
    "peers.trl": "trl_side:run_trl_side",
    "peers.llamafactory": "llamafactory_side:run_llamafactory_side",
    "peers.score": "peers:score_side",
}


def _task_function(task: str):
    if task not in TASKS:
        raise ValueError(f"unknown bench task {task!r}")
    module_name, function_name = TASKS[task].split(":")
    return getattr(importlib.import_module(f"ftflow.bench.{module_name}"), function_name)


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux: the most resident memory this process ever held
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_in_process(task: str, **kwargs) -> dict:
    """Run one task here (quick mode: no process start-up; peak_rss_mb is then this process's so far)."""
    result = _task_function(task)(**kwargs)
    result.setdefault("peak_rss_mb", _peak_rss_mb())  # a task that runs a child process reports the child's
    return result


def run_in_subprocess(task: str, timeout: int = 3600, **kwargs) -> dict:
    """Run one task in a new Python process and return its result (peak_rss_mb added)."""
    if task not in TASKS:  # fail here, not in the child
        raise ValueError(f"unknown bench task {task!r}")
    with tempfile.TemporaryDirectory(prefix="ftflow-bench-") as tmp:
        task_path, result_path = os.path.join(tmp, "task.json"), os.path.join(tmp, "result.json")
        write_json(task_path, {"task": task, "kwargs": kwargs})
        proc = subprocess.run(
            [sys.executable, "-m", "ftflow.bench.worker", task_path, result_path],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0 or not os.path.exists(result_path):
            raise FtflowError(f"bench: {task} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
        return read_json(result_path)


def main(argv: list[str]) -> int:
    task_path, result_path = argv
    spec = read_json(task_path)
    write_json(result_path, run_in_process(spec["task"], **spec["kwargs"]))
    return 0


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    sys.exit(main(sys.argv[1:]))
