"""`ftflow bench`: run every benchmark in one process tree and write results.json and results.md.

machine peak -> inputs -> training -> machine peak again -> generation
-> workflow overhead -> tokenization -> GPU (or why not) -> targets -> write
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time

from ..atomic import read_json, write_json, write_text
from ..errors import FtflowError
from ..provenance import device_info, git_commit, package_versions
from .flops import matmul_peak
from .inputs import BenchSettings, prepare_inputs

# The targets for ftflow on a 2-core CPU: (result path, goal, "at least" or "at most", what it means)
TARGETS = (
    ("train.lora.speedup", 4.0, "at least", "useful tokens/s over the baseline recipe, LoRA"),
    ("train.full.speedup", 4.0, "at least", "useful tokens/s over the baseline recipe, full fine-tuning"),
    ("train.lora.compute_efficiency", 0.60, "at least", "model FLOP/s / measured fp32 matmul peak, LoRA"),
    ("eval.speedup", 5.0, "at least", "batched eval generation examples/s over one prompt at a time"),
    ("dag.seconds.500", 10.0, "at most", "`snakemake -n` of a 500-experiment sweep, seconds"),
)


def lookup(results: dict, dotted: str):
    value = results
    for part in dotted.split("."):
        value = value[part]
    return value


def check_targets(results: dict) -> list[dict]:
    rows = []
    for path, goal, direction, meaning in TARGETS:
        value = lookup(results, path)
        met = value >= goal if direction == "at least" else value <= goal
        rows.append(
            {"key": path, "goal": goal, "direction": direction, "value": value, "met": bool(met), "meaning": meaning}
        )
    return rows


def machine_info() -> dict:
    """Provenance's device facts, plus the CPU model and memory that timings depend on."""
    info = device_info()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            info["cpu"] = next(
                (line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), None
            )
        with open("/proc/meminfo", encoding="utf-8") as handle:
            kib = next(int(line.split()[1]) for line in handle if line.startswith("MemTotal"))
            info["memory_gib"] = round(kib / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    if info.get("gpus"):
        info["gpu"] = info["gpus"][0]
    return info


def _relative_paths(value, root: str):
    """`value` with every absolute path under `root` made relative to it."""
    if isinstance(value, dict):
        return {k: _relative_paths(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative_paths(v, root) for v in value]
    if isinstance(value, str) and os.path.isabs(value) and (value == root or value.startswith(root + os.sep)):
        return os.path.relpath(value, root)
    return value


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_bench(
    out: str,
    work: str,
    configfile: str,
    quick: bool,
    gpu: bool,
    cores: int,
    command: str,
    log=print,
    keep_peers: bool = False,
) -> dict:
    from transformers.utils import logging as hf_logging

    from . import dag, generation, tokenization, train_throughput
    from .gpu import bench_gpu
    from .peers import bench_peers
    from .report import render_markdown
    from .worker import run_in_process, run_in_subprocess

    hf_logging.disable_progress_bar()
    kept = kept_peers(out, log=log) if keep_peers else None  # before the long part: a missing one fails now
    started = time.perf_counter()
    settings = BenchSettings.for_mode(quick)
    # --quick runs every side in this process (no start-up per run); timings are then for CI only
    run_task = run_in_process if quick else run_in_subprocess
    results: dict = {
        "command": command,
        "quick": quick,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_average_start": load_average(),
        "settings": dataclasses.asdict(settings),
    }
    inputs = prepare_inputs(work, configfile, smoke=quick, cores=cores)
    log(
        f"inputs: {inputs.model_dir} ({'tiny stand-in' if quick else 'embedded model'}), {inputs.data_dir}; setup {inputs.setup_seconds:.1f} s"
    )
    peaks = [matmul_peak(settings.matmul_size, settings.matmul_repeats, device="cpu")]
    log(f"fp32 matmul peak: {peaks[0]['gflops']:.1f} GFLOP/s")
    results["inputs"] = {k: v for k, v in inputs.to_json().items() if k not in ("stage", "eval")}
    results["inputs"]["training"] = {
        k: inputs.stage["training"].get(k)
        for k in ("per_device_train_batch_size", "learning_rate", "lr_scheduler_type", "warmup_steps")
    }
    results["inputs"]["lora"] = inputs.stage["lora"]

    runs = train_throughput.compare_training(inputs, settings, run_task, log=log)
    peaks.append(matmul_peak(settings.matmul_size, settings.matmul_repeats, device="cpu"))
    peak = max(peaks, key=lambda p: p["gflops"])
    results["matmul_peak"] = {**peak, "measurements_gflops": [p["gflops"] for p in peaks]}
    results["train"] = train_throughput.summarize_training(runs, peak["gflops"])
    results["train"]["steps"] = settings.train_steps
    results["train"]["examples_per_step"] = runs["lora"]["ftflow"][0]["examples_per_step"]

    results["eval"] = generation.compare_generation(inputs, settings, run_task, log=log)
    results["dag"] = dag.bench_dag(inputs.configfile, settings, log=log)
    results["tokenize"] = {
        "kinds": tokenization.bench_kinds(inputs, settings, log=log),
        "cache_hit": tokenization.bench_cache_hit(inputs),
    }
    results["gpu"] = bench_gpu(inputs, settings, run_task, requested=gpu, log=log)
    if kept is not None:
        results["peers"] = kept
    else:
        results["peers"] = bench_peers(inputs, settings, run_task, log=log, command=command)

    results["targets"] = check_targets(results)
    results["load_average_end"] = load_average()
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["provenance"] = {"git_commit": git_commit(), "packages": package_versions()}
    os.makedirs(out, exist_ok=True)
    results = _relative_paths(results, os.getcwd())  # a results file names no folder of the machine it ran on
    write_json(os.path.join(out, "results.json"), results)
    write_text(os.path.join(out, "results.md"), render_markdown(results))
    return results


def kept_peers(out: str, log=print) -> dict:
    """`--keep-peers`: the peer comparison OUT/results.json holds, as it was measured (its own command and load)."""
    path = os.path.join(out, "results.json")
    peers = read_json(path).get("peers") if os.path.exists(path) else None
    if not peers:
        raise FtflowError(f"bench --keep-peers: {path} holds no peer comparison; run `ftflow bench --only peers` first")
    log(f"peers: kept from {path} ({peers.get('command')}, {peers.get('seconds')} s)")
    return peers


def run_peers_only(
    out: str,
    work: str,
    configfile: str,
    quick: bool,
    cores: int,
    command: str,
    steps: int | None = None,
    rounds: int | None = None,
    log=print,
) -> dict:
    """`ftflow bench --only peers`: the peer comparison alone, written into OUT/results.json's `peers`
    (the rest of an earlier full run kept) and rendered into results.md."""
    from transformers.utils import logging as hf_logging

    from .peers import bench_peers
    from .peers_report import render_peers_only
    from .report import render_markdown
    from .worker import run_in_process, run_in_subprocess

    hf_logging.disable_progress_bar()
    settings = BenchSettings.for_mode(quick)
    inputs = prepare_inputs(work, configfile, smoke=quick, cores=cores, merged=False)
    run_task = run_in_process if quick else run_in_subprocess
    peers = bench_peers(inputs, settings, run_task, log=log, command=command, steps=steps, rounds=rounds)
    path = os.path.join(out, "results.json")
    results = read_json(path) if os.path.exists(path) else None
    os.makedirs(out, exist_ok=True)
    if results is not None and "train" in results:
        results["peers"] = _relative_paths(peers, os.getcwd())
        write_json(path, results)
        write_text(os.path.join(out, "results.md"), render_markdown(results))
    else:
        results = {"command": command, "machine": machine_info(), "peers": _relative_paths(peers, os.getcwd())}
        write_json(path, results)
        write_text(os.path.join(out, "results.md"), render_peers_only(results))
    return results
