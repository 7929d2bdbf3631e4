"""Shared fixtures: the repository, the embedded tokenizer, and real snakemake runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Tests never reach a hub: offline mode fails a hub lookup at once instead of after retries.
# Set before anything imports huggingface_hub (it reads these once), and inherited by the jobs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "workflow"))


def snakemake(workdir: Path, *args: str, check: bool = True, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real snakemake on the repository's Snakefile inside `workdir`."""
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *args]
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def planned_jobs(output: str) -> set[tuple[str, str]]:
    """{(rule, wildcards text)} of the jobs a dry run lists."""
    jobs = set()
    rule = None
    for line in output.splitlines():
        match = re.match(r"^(?:local)?rule (\w+):", line.strip())
        if match:
            if rule is not None:
                jobs.add((rule, ""))
            rule = match.group(1)
            continue
        match = re.match(r"^wildcards: (.*)$", line.strip())
        if match and rule is not None:
            jobs.add((rule, match.group(1)))
            rule = None
    if rule is not None:
        jobs.add((rule, ""))
    return jobs


@pytest.fixture(scope="session")
def embedded_tokenizer():
    from ftflow.prepare import embedded_tokenizer as load

    return load()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def copy_config(src: Path, workdir: Path, name: str = "config.yaml") -> Path:
    target = workdir / name
    shutil.copy(src, target)
    return target


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


# The longest test files first: `make test` hands whole files to its parallel workers in
# collection order, and a long file started last would run alone at the end.
LONGEST_FIRST = [
    "test_report_workflow.py",
    "test_crash_safety.py",
    "test_curricula.py",
    "test_workflow.py",
    "test_slurm.py",
    "test_bench.py",
    "test_poems_example.py",
    "test_embedded_model.py",
    "test_ddp.py",
    "test_bad_configs.py",
    "test_methods.py",
]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
