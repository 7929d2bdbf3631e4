"""The peer sides of `ftflow bench`: TRL trains for real on a tiny model and labels what ftflow labels;
LLaMA-Factory's YAML and dataset_info.json are generated from the same settings (its virtualenv is
built only by `ftflow bench`, too slow for the test suite)."""

from __future__ import annotations

import json
import math

import pytest

from helpers import tokenize_dataset

STAGE = {
    "training": {
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 1,
        "seed": 42,
    },
    "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"},
}


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory, embedded_tokenizer):
    """A tiny random Llama with the embedded tokenizer, and 8 column-mapping rows tokenized by ftflow."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    work = tmp_path_factory.mktemp("peers")
    model_dir = work / "model"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(embedded_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=embedded_tokenizer.bos_token_id,
        eos_token_id=embedded_tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(model_dir)
    embedded_tokenizer.save_pretrained(model_dir)
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Map header {i}: Qty_{i}"},
                {"role": "assistant", "content": f'{{"quantity": "Qty_{i}"}}'},
            ]
        }
        for i in range(8)
    ]
    (work / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    tokenize_dataset(work, model_dir, {"source": "rows.jsonl", "kind": "chat"}, max_length=256)
    return work, model_dir


@pytest.mark.slow
def test_trl_side_trains_and_labels_the_positions_ftflow_labels(tiny_job):
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    from ftflow.bench.trl_side import run_trl_side
    from ftflow.evaluation import dataset_loss

    work, model_dir = tiny_job
    out = run_trl_side(
        str(model_dir),
        str(work / "out"),
        str(work / "spec.json"),
        str(work),
        STAGE,
        "lora",
        steps=2,
        out_dir=str(work / "trl"),
        save_dir=str(work / "trl-adapter"),
    )
    # TRL's own tokenization of the same rows: the same ids, the same labelled positions, every example
    assert out["labels"]["examples"] == out["examples"] == 8
    assert out["labels"]["identical_labels"] == 8, out["labels"]["differences"]
    assert out["steps"] == 2 and len(out["losses"]) == 2 and all(math.isfinite(x) for x in out["losses"])
    # LoRA starts as the base model (B = 0): TRL's first-step loss is ftflow's fp32 loss on those 4 examples
    # (TRL's own default, bf16 autocast on the CPU, moved it by about 1e-3 on the embedded model)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    first = load_from_disk(str(work / "out" / "train")).select(range(4))
    assert out["losses"][0] == pytest.approx(dataset_loss(base, first, "cpu")["eval_loss"], rel=1e-5)
    assert json.loads((work / "trl-adapter" / "adapter_config.json").read_text())["r"] == 4


def test_trl_side_trains_in_fp32_on_the_cpu_and_bf16_only_when_asked(tmp_path):
    from ftflow.bench.trl_side import trl_config

    cpu = trl_config(STAGE, 2, str(tmp_path))
    assert (cpu.bf16, cpu.fp16, cpu.use_cpu, cpu.padding_free) == (False, False, True, True)
    assert trl_config(STAGE, 2, str(tmp_path), bf16=True).bf16 is True


def test_llamafactory_job_files_carry_the_experiments_settings(tmp_path):
    import yaml

    from ftflow.bench.llamafactory_side import job_settings, template_name, write_job

    stage = {**STAGE, "training": {**STAGE["training"], "gradient_accumulation_steps": 2, "weight_decay": 0.01}}
    settings = job_settings("/m", str(tmp_path), "smollm2", stage, "lora", 6, 256, "/o", "/t")
    records = [{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}]
    job = yaml.safe_load(open(write_job(str(tmp_path), records, settings), encoding="utf-8"))
    assert job["finetuning_type"] == "lora" and job["stage"] == "sft" and job["max_steps"] == 6
    assert (job["lora_rank"], job["lora_alpha"], job["lora_dropout"], job["lora_target"]) == (4, 8, 0.0, "all")
    assert (job["learning_rate"], job["lr_scheduler_type"], job["warmup_steps"], job["seed"]) == (1e-3, "cosine", 1, 42)
    assert (job["per_device_train_batch_size"], job["gradient_accumulation_steps"], job["weight_decay"]) == (4, 2, 0.01)
    assert job["disable_shuffling"] is True and job["cutoff_len"] == 256 and job["logging_steps"] == 1
    assert not job["bf16"] and not job["fp16"]
    # LLaMA-Factory checkpoints activations unless told not to; the stage says off
    assert job["disable_gradient_checkpointing"] is True and job["gradient_checkpointing"] is False
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert rows == [{"messages": records[0]["prompt"] + records[0]["completion"]}]
    info = json.loads((tmp_path / "dataset_info.json").read_text())[job["dataset"]]
    assert info["file_name"] == "rows.json" and info["formatting"] == "sharegpt"
    full = job_settings("/m", str(tmp_path), "smollm2", stage, "full", 6, 256, "/o", "/t")
    assert full["finetuning_type"] == "full" and "lora_rank" not in full
    assert template_name("{{ 'You are a helpful AI assistant named SmolLM' }}<|im_start|>") == "smollm2"
    with pytest.raises(Exception, match="no LLaMA-Factory template"):
        template_name("[INST]")


def test_sides_rotate_and_ratios_compare_ftflow_with_each_peer():
    from ftflow.bench.peers import rotation, summarize_peers

    sides = ("ftflow", "trl", "llamafactory")
    orders = [rotation(sides, k) for k in range(3)]
    assert orders[0] == sides and {o[0] for o in orders} == set(sides)

    def side(rates, rss, loss, eval_loss):
        runs = [
            {"useful_tokens_per_second": r, "peak_rss_mb": rss, "timed_cpu_seconds": 1.0, "losses": [2.0, loss]}
            for r in rates
        ]
        return {"runs": runs, "score": {"eval_loss": eval_loss, "metrics": {"exact_match": 0.5}}}

    summary = summarize_peers(
        {"lora": {"ftflow": side([70, 80, 90], 4000, 0.1, 0.2), "trl": side([40, 41, 60], 5000, 0.12, 0.25)}}
    )
    assert summary["sides"]["lora"]["ftflow"]["useful_tokens_per_second"] == 80
    assert summary["trl"]["lora"] == {
        "speedup": round(80 / 41, 3),
        "memory_ratio": 0.8,
        "loss_gap": -0.02,
        "eval_loss_gap": -0.05,
    }


def test_keep_peers_takes_the_measured_comparison_or_fails_before_measuring(tmp_path):
    from ftflow.bench.runner import kept_peers
    from ftflow.errors import FtflowError

    with pytest.raises(FtflowError, match="holds no peer comparison; run `ftflow bench --only peers` first"):
        kept_peers(str(tmp_path))
    (tmp_path / "results.json").write_text(json.dumps({"train": {}, "peers": {"command": "ftflow bench --only peers"}}))
    assert kept_peers(str(tmp_path), log=lambda _: None) == {"command": "ftflow bench --only peers"}
