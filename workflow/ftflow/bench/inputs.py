"""What every benchmark runs on: the embedded default's model, data and settings.

ftflow's own workflow, run in the bench work folder, prepares the model,
tokenizes the data and trains and merges the measured experiment (the
embedded default's lora-r16, whose merged model the generation benchmark
decodes with), so the benchmark measures exactly what `make run` trains on,
and a second bench run finds all of it in place and redoes none of it.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import FtflowError

REPO = Path(__file__).resolve().parents[3]
SNAKEFILE = REPO / "Snakefile"


@dataclass(frozen=True)
class BenchSettings:
    """How much work each measurement does; `--quick` shrinks all of it for CI."""

    quick: bool
    train_steps: int  # optimizer steps per training run; the first is a warm-up and not timed
    train_rounds: int  # runs per side and method, alternating which side goes first
    generation_examples: int | None  # test prompts decoded per side (None: the whole split)
    generation_rounds: int
    dag_sizes: tuple[int, ...]  # sweep experiments in the generated configs
    dag_repeats: int  # `snakemake -n` runs per size after the first (which writes every config.json)
    tokenize_rows: int  # train rows per data kind in the tokenization benchmark
    matmul_size: int = 2048  # square fp32 matmul that measures the machine's peak
    matmul_repeats: int = 10

    @classmethod
    def for_mode(cls, quick: bool) -> "BenchSettings":
        if quick:
            return cls(
                True,
                train_steps=2,
                train_rounds=1,
                generation_examples=4,
                generation_rounds=1,
                dag_sizes=(10, 100, 500),
                dag_repeats=0,
                tokenize_rows=64,
                matmul_repeats=3,
            )
        # About 10-15 minutes on an idle 2-core CPU; most of it is the padded baseline.
        return cls(
            False,
            train_steps=6,
            train_rounds=2,
            generation_examples=None,
            generation_rounds=1,
            dag_sizes=(10, 100, 500),
            dag_repeats=2,
            tokenize_rows=2000,
        )


@dataclass(frozen=True)
class BenchInputs:
    """Paths and resolved settings shared by the benchmarks (plain data: it is passed to worker processes)."""

    work: str  # the bench work folder (a Snakemake working directory)
    configfile: str  # the config the bench ran on (copied into `work`)
    smoke: bool  # quick mode: the tiny random stand-in of the same architecture
    experiment: str  # the experiment whose stage settings the training runs use
    model: str
    model_dir: str
    data_dir: str  # tokenized train/validation/test splits of the experiment's dataset
    data_spec: str  # the tokenize job's spec (source settings, max_length, ...)
    eval_data_dir: str
    eval_model_dir: str  # the experiment's merged model: what its eval step decodes with
    stage: dict  # the experiment's resolved (LoRA) stage
    eval: dict  # the experiment's resolved eval settings
    max_length: int
    setup_seconds: float  # the workflow run that prepared and tokenized (near 0 once cached)

    def to_json(self) -> dict:
        return asdict(self)


def default_configfile() -> str:
    """config.yaml in the current folder, else the embedded default of this checkout."""
    for candidate in (Path("config.yaml"), REPO / "config.yaml"):
        if candidate.exists():
            return str(candidate.resolve())
    raise FtflowError("bench: no config.yaml here or in the ftflow checkout; pass --configfile")


def snakemake_binary() -> str:
    """The snakemake installed beside this Python (the venv's), else the one on PATH."""
    binary = Path(sys.executable).parent / "snakemake"
    exe = str(binary) if binary.exists() else shutil.which("snakemake")
    if exe is None:
        raise FtflowError("bench: the snakemake command is not installed beside this Python")
    return exe


def snakemake_command(work: str, configfile: str, smoke: bool, *args: str) -> list[str]:
    """The real snakemake on ftflow's Snakefile, run in `work`."""
    if not SNAKEFILE.exists():
        raise FtflowError(f"bench: the workflow's Snakefile is not at {SNAKEFILE} (run from an ftflow checkout)")
    command = [snakemake_binary(), "-s", str(SNAKEFILE), "--directory", work, "--configfile", configfile, *args]
    if smoke:
        command += ["--config", "smoke=true"]
    return command


def run_snakemake(command: list[str], what: str, timeout: int = 3600, cwd: str | None = None) -> tuple[float, str]:
    """(wall seconds, output) of one snakemake run; a failure names the step and shows its output."""
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    seconds = time.perf_counter() - started
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise FtflowError(f"bench: {what} failed (snakemake exit {proc.returncode}):\n{output[-4000:]}")
    return seconds, output


def pick_experiment(plan):
    """The first experiment of the config trained in one LoRA stage (the embedded default's lora-r16)."""
    for exp in plan.experiments.values():
        if not exp.baseline and len(exp.stages) == 1 and exp.stages[0].method == "lora":
            return exp
    raise FtflowError(
        "bench: the config has no experiment trained in one LoRA stage; the training benchmark starts from one"
    )


def prepare_inputs(work: str, configfile: str, smoke: bool, cores: int, merged: bool = True) -> BenchInputs:
    """Prepare the model and tokenize the data through the workflow, in `work`; reuse what is there
    (merged=False: without training the experiment's merged model, which only the generation benchmark reads)."""
    from ..config import build_plan, load_workflow_config

    work = os.path.abspath(work)
    os.makedirs(work, exist_ok=True)
    local_config = os.path.join(work, "config.yaml")
    if not (os.path.exists(local_config) and filecmp.cmp(configfile, local_config, shallow=False)):
        shutil.copyfile(configfile, local_config)

    raw = load_workflow_config([local_config], {"smoke": True} if smoke else None)
    results = os.path.join(work, "results")
    plan = build_plan(raw, workdir=work, results=results)
    exp = pick_experiment(plan)
    stage = exp.stages[0]
    model_dir = os.path.join(results, "models", plan.model_dir_name(exp.model))
    merged_dir = f"results/{exp.name}/{stage.name}/merged"
    targets = sorted(
        {f"results/data/{stage.data_id}", f"results/data/{exp.eval.data_id}"} | ({merged_dir} if merged else set())
    )
    command = snakemake_command(work, local_config, smoke, "--cores", str(cores), *targets)
    seconds, _ = run_snakemake(
        command, f"preparing {exp.model}, tokenizing {', '.join(stage.datasets)} and training {exp.name} in {work}"
    )
    return BenchInputs(
        work=work,
        configfile=local_config,
        smoke=smoke,
        experiment=exp.name,
        model=exp.model,
        model_dir=model_dir,
        data_dir=os.path.join(results, "data", stage.data_id),
        data_spec=os.path.join(results, "data", stage.data_id + ".json"),
        eval_data_dir=os.path.join(results, "data", exp.eval.data_id),
        eval_model_dir=os.path.join(work, merged_dir),
        stage=asdict(stage),
        eval=asdict(exp.eval),
        max_length=stage.max_length,
        setup_seconds=round(seconds, 2),
    )
