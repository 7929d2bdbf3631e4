"""`ftflow bench`: the quick run end to end, and the accounting it reports.

These tests check that the benchmark runs and counts correctly; they never
assert on speed (timings on a shared CI machine mean nothing).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from ftflow.bench.dag import growth, planned_job_counts
from ftflow.bench.flops import linear_weights, training_flops
from ftflow.bench.runner import TARGETS, lookup
from helpers import BIN, REPO

REQUIRED_KEYS = (
    "train.lora.speedup",
    "train.full.speedup",
    "train.lora.compute_efficiency",
    "eval.speedup",
    "dag.seconds.500",
)


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def quick_results(quick_out):
    out = quick_out
    proc = subprocess.run(
        [
            str(BIN / "ftflow"),
            "bench",
            "--quick",
            "--out",
            str(out),
            "--work",
            str(out / "work"),
            "--configfile",
            str(REPO / "config.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=out,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    results = json.loads((out / "results.json").read_text())
    return results, (out / "results.md").read_text()


@pytest.mark.workflow
def test_quick_bench_writes_every_required_number(quick_results):
    results, markdown = quick_results
    for key in REQUIRED_KEYS + tuple(t[0] for t in TARGETS):
        value = lookup(results, key)
        assert isinstance(value, (int, float)) and not isinstance(value, bool), key
        assert math.isfinite(value), key
    assert results["quick"] is True
    assert [t["key"] for t in results["targets"]] == [t[0] for t in TARGETS]
    assert "## Targets" in markdown and "Quick mode" in markdown
    assert "| lora | ftflow |" in markdown and "| full | padded recipe |" in markdown


@pytest.mark.workflow
def test_quick_bench_compares_like_with_like(quick_results):
    results, _ = quick_results
    for method in ("lora", "full"):
        base, ours = results["train"][method]["baseline"], results["train"][method]["ftflow"]
        base_run, our_run = base["runs"][0], ours["runs"][0]
        # the recipe's own tokenization reproduces ftflow's tokens for every example, then pads
        assert base_run["identical_token_examples"] == base_run["examples"] == our_run["examples"]
        # same examples in the timed steps: the same real and useful tokens on both sides
        assert base_run["tokens"]["real"] == our_run["tokens"]["real"]
        assert base_run["tokens"]["useful"] == our_run["tokens"]["useful"] > 0
        assert ours["pad_fraction"] == 0.0 < base["pad_fraction"]
        # ftflow computes logits only where a label is; the recipe at every padded position
        assert our_run["tokens"]["logit_positions"] == our_run["tokens"]["useful"]
        assert base_run["tokens"]["logit_positions"] == base_run["tokens"]["positions"] > our_run["tokens"]["positions"]
        assert results["train"][method]["work_ratio"] > 1
    gen = results["eval"]
    # batching (left padding) must not change a greedy answer: every one identical, token for token
    assert gen["identical"] == gen["examples"] > 0
    assert results["tokenize"]["cache_hit"]["tokenize_jobs_planned"] == 0
    assert set(results["tokenize"]["kinds"]) == {"chat", "instruction", "text"}
    assert results["dag"]["jobs"]["500"] > 3 * 500  # train, merge and eval per experiment, plus shared jobs
    assert results["gpu"].get("skipped") or results["gpu"]["train"]["qlora"]["ftflow"]["peak_gpu_mb"] > 0


@pytest.mark.workflow
def test_quick_bench_compares_the_trl_peer_on_the_same_job(quick_results):
    results, markdown = quick_results
    peers = results["peers"]
    for method in ("lora", "full"):
        ratios = peers["trl"][method]
        for key in ("speedup", "memory_ratio", "loss_gap", "eval_loss_gap"):
            assert math.isfinite(ratios[key]), (method, key)
        for side in ("ftflow", "trl"):
            summary = peers["sides"][method][side]
            assert len(summary["losses"]) == peers["steps"] and summary["eval_loss"] > 0
        labels = peers["sides"][method]["trl"]["labels"]
        assert labels["identical_labels"] == labels["examples"] > 0, labels["differences"]
    assert "llamafactory" in peers["skipped"]  # its virtualenv is built by a full run only
    assert "## Peers: ftflow, TRL and LLaMA-Factory on the same job" in markdown


def test_training_flops_by_method():
    weights = {"body": 10, "adapter": 2, "head": 5}
    # full: 6 per weight per token, 6 per head weight per logit
    assert training_flops(weights, "full", tokens=3, logit_positions=2) == 6 * 10 * 3 + 6 * 5 * 2
    # LoRA: frozen body and head get activation gradients only (4 = 2 forward + 2 backward); the adapter trains (6)
    assert training_flops(weights, "lora", tokens=3, logit_positions=2) == (4 * 10 + 6 * 2) * 3 + 4 * 5 * 2
    assert training_flops(weights, "qlora", tokens=1, logit_positions=0) == 4 * 10 + 6 * 2


def test_linear_weights_split_body_adapter_and_head():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    per_layer = 16 * 16 + 16 * 8 * 2 + 16 * 16 + 16 * 32 * 3  # q, k and v (2 kv heads x 4), o, gate/up/down
    assert linear_weights(model) == {"body": 2 * per_layer, "adapter": 0, "head": 100 * 16}
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    adapter = 2 * ((16 * 2 + 2 * 16) + (16 * 2 + 2 * 8))  # per layer: A and B of q_proj and v_proj
    assert linear_weights(lora) == {"body": 2 * per_layer, "adapter": adapter, "head": 100 * 16}


def test_growth_is_linear_for_a_constant_cost_per_experiment():
    seconds = {"10": 1.0 + 10 * 0.01, "100": 1.0 + 100 * 0.01, "500": 1.0 + 500 * 0.01}
    out = growth(seconds)
    assert out["marginal_seconds_per_experiment"] == {"10-100": 0.01, "100-500": 0.01}
    assert out["marginal_ratio"] == 1.0
    quadratic = {k: 1.0 + (int(k) ** 2) * 1e-4 for k in seconds}
    assert growth(quadratic)["marginal_ratio"] > 4


def test_planned_job_counts_reads_the_job_stats_table():
    output = "Building DAG of jobs...\nJob stats:\njob              count\n-------------  -------\nevaluate             3\ntrain                2\ntotal                5\n\nReasons:\n"
    assert planned_job_counts(output) == {"evaluate": 3, "train": 2, "total": 5}
    assert planned_job_counts("Nothing to be done.") == {}


def test_bench_refuses_a_config_without_a_lora_experiment(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text((REPO / "config.yaml").read_text().replace("method: lora", "method: full"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ftflow",
            "bench",
            "--quick",
            "--out",
            str(tmp_path / "out"),
            "--configfile",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert "no experiment trained in one LoRA stage" in proc.stderr
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.workflow
def test_the_gpu_sections_code_runs_on_a_cpu_with_a_tiny_shape(quick_results, quick_out):
    """`ftflow bench --gpu` cannot run here; its code path can, in bf16 on the CPU with a 2-layer Qwen3."""
    from transformers import AutoTokenizer

    from ftflow.bench.gpu import bench_gpu
    from ftflow.bench.inputs import prepare_inputs
    from ftflow.bench.runner import BenchSettings
    from ftflow.bench.worker import run_in_process
    from ftflow.prepare import TINY_SIZES

    inputs = prepare_inputs(str(quick_out / "work"), str(REPO / "config.yaml"), smoke=True, cores=2, merged=False)
    vocab = len(AutoTokenizer.from_pretrained(inputs.model_dir))
    tiny = dict(TINY_SIZES, vocab_size=vocab, tie_word_embeddings=True)
    settings = BenchSettings.for_mode(True)
    gpu = bench_gpu(inputs, settings, run_in_process, requested=True, log=lambda *_: None, device="cpu", sizes=tiny)
    assert set(gpu["train"]) == {"lora", "full", "qlora"}
    for method in ("lora", "full"):
        trl = gpu["trl"][method]
        assert len(trl["runs"]) == settings.train_rounds
        assert trl["labels"]["identical_labels"] == trl["labels"]["examples"] > 0
        assert math.isfinite(trl["speedup"]) and trl["speedup"] > 0
        assert abs(trl["train_loss_gap"]) < 0.05 * trl["train_loss"], trl  # bf16 on both sides: close, not equal
