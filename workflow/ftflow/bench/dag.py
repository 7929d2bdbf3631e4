"""Workflow overhead: planning a sweep of 10, 100 and 500 experiments.

For each size, a config with the bench config's models, datasets and defaults
and one sweep of N experiments (a grid over `training.seed`) is written to a
fresh folder, then timed:
  snakemake -n   first run (it writes every experiment's config.json), then repeats
  ftflow resolve the command's wall time (Python start-up included) and its own
                 resolution time
A trivial Snakefile with the same number of jobs (3 chained rules x N) gives
the floor: what Snakemake itself needs to plan that many jobs.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from ..errors import FtflowError
from .inputs import run_snakemake, snakemake_binary, snakemake_command

SWEEP = "seeds"
FLOOR_SNAKEFILE = """\
N = {chains}


rule all:
    input:
        expand("c/{{i}}.txt", i=range(N)),


rule a:
    output:
        "a/{{i}}.txt",
    shell:
        "touch {{output}}"


rule b:
    input:
        "a/{{i}}.txt",
    output:
        "b/{{i}}.txt",
    shell:
        "touch {{output}}"


rule c:
    input:
        "b/{{i}}.txt",
    output:
        "c/{{i}}.txt",
    shell:
        "touch {{output}}"
"""


def sweep_config(base_config: str, experiments: int) -> dict:
    """The bench config's models, datasets and defaults, and one sweep of `experiments` experiments."""
    with open(base_config, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle) or {}
    config = {key: raw[key] for key in ("models", "datasets", "defaults") if key in raw}
    config["sweeps"] = {SWEEP: {"experiment": {}, "grid": {"training.seed": list(range(experiments))}}}
    return config


def planned_job_counts(output: str) -> dict[str, int]:
    """{rule: jobs} from the 'Job stats' table of a dry run."""
    counts = {}
    in_table = False
    for line in output.splitlines():
        if line.startswith("Job stats:"):
            in_table = True
            continue
        if in_table:
            match = re.match(r"^(\w+)\s+(\d+)\s*$", line.strip())
            if match:
                counts[match.group(1)] = int(match.group(2))
            elif counts and not line.strip():
                break
    return counts


def _resolve(folder: str, configfile: str) -> tuple[float, float, int]:
    """(command wall seconds, resolution seconds it reports, experiments) of `ftflow resolve --json`."""
    command = [
        sys.executable,
        "-m",
        "ftflow",
        "resolve",
        "--configfile",
        configfile,
        "--json",
        "--results",
        os.path.join(folder, "results"),
    ]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=folder, timeout=600)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise FtflowError(f"bench: ftflow resolve failed in {folder}:\n{proc.stderr[-3000:]}")
    data = json.loads(proc.stdout)
    return wall, data["seconds"], len(data["experiments"])


def _floor_seconds(folder: str, chains: int) -> float:
    snakefile = os.path.join(folder, "Snakefile")
    Path(snakefile).write_text(FLOOR_SNAKEFILE.format(chains=chains))
    seconds, _ = run_snakemake(
        [snakemake_binary(), "-s", snakefile, "--directory", folder, "-n", "--cores", "1"],
        "the trivial-DAG dry run",
        cwd=folder,
    )
    return seconds


def bench_dag(configfile: str, settings, log=print) -> dict:
    seconds, repeats, resolve, counts, floor = {}, {}, {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="ftflow-bench-dag-") as tmp:
        for size in settings.dag_sizes:
            folder = os.path.join(tmp, f"sweep-{size}")
            os.makedirs(folder)
            config_path = os.path.join(folder, "config.yaml")
            with open(config_path, "w", encoding="utf-8") as handle:
                yaml.safe_dump(sweep_config(configfile, size), handle, sort_keys=False)
            command = snakemake_command(folder, config_path, False, "-n", "--cores", "2")
            first, output = run_snakemake(command, f"the {size}-experiment dry run")
            jobs = planned_job_counts(output)
            if jobs.get("train", 0) != size:
                raise FtflowError(
                    f"bench: the {size}-experiment dry run planned {jobs.get('train', 0)} train jobs, not {size}"
                )
            again = [run_snakemake(command, f"the {size}-experiment dry run")[0] for _ in range(settings.dag_repeats)]
            wall, own, experiments = _resolve(folder, config_path)
            key = str(size)
            seconds[key] = round(first, 3)
            repeats[key] = round(statistics.median(again), 3) if again else None
            resolve[key] = {
                "command_seconds": round(wall, 3),
                "resolve_seconds": round(own, 4),
                "experiments": experiments,
            }
            counts[key] = jobs.get("total", sum(v for k, v in jobs.items() if k != "total"))
            log(f"dag {size}: snakemake -n {first:.2f} s ({counts[key]} jobs), ftflow resolve {wall:.2f} s")
        if not settings.quick:
            largest = max(settings.dag_sizes)
            folder = os.path.join(tmp, "floor")
            os.makedirs(folder)
            floor = {"jobs": 3 * largest + 1, "seconds": round(_floor_seconds(folder, largest), 3)}
            log(f"dag floor: trivial {floor['jobs']}-job dry run {floor['seconds']:.2f} s")
    return {
        "seconds": seconds,
        "repeat_seconds": repeats,
        "jobs": counts,
        "resolve": resolve,
        "floor": floor or None,
        "growth": growth(seconds),
    }


def growth(seconds: dict[str, float]) -> dict:
    """How the dry-run time grows: marginal seconds per experiment between sizes, and their ratio.

    Linear growth keeps the marginal cost per experiment constant (ratio ~1);
    a ratio well above 1 means each experiment costs more as the sweep grows.
    """
    sizes = sorted(int(k) for k in seconds)
    marginal = {}
    for small, large in zip(sizes, sizes[1:]):
        marginal[f"{small}-{large}"] = round((seconds[str(large)] - seconds[str(small)]) / (large - small), 5)
    values = list(marginal.values())
    out = {
        "marginal_seconds_per_experiment": marginal,
        "largest_over_smallest": round(seconds[str(sizes[-1])] / seconds[str(sizes[0])], 3),
    }
    if len(values) >= 2 and values[0] > 0:
        out["marginal_ratio"] = round(values[-1] / values[0], 3)
    return out
