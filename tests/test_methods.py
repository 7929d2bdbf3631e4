"""Each method trains for real on a tiny model, and its merged model is the model it trained.

The steps run in this process (no snakemake: a job's start-up would cost more
than its work): config -> prepare (smoke stand-in) -> tokenize -> train ->
merge, through the same functions the `ftflow` commands call.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from ftflow import adalora, models
from ftflow.config import build_plan
from ftflow.model_setup import setup_for_training
from ftflow.specs import StageSpec
from ftflow.status import read_status
from ftflow.train import load_training_data
from ftflow.trainer import FtflowTrainer, build_training_arguments
from helpers import Workspace, raw_config

EXPERIMENTS = {
    "full": {"method": "full", "training": {"learning_rate": 1.0e-4}},
    "lora": {"method": "lora", "training": {"gradient_accumulation_steps": 2}},
    "qlora": {"method": "qlora", "quantization": {"quant_type": "nf4", "double_quant": True}},
    "adalora": {
        "method": "adalora",
        "adalora": {"init_r": 6, "target_r": 2, "lora_alpha": 8, "lora_dropout": 0.0, "orth_reg_weight": 0.5},
        "training": {"optim": "paged_adamw_32bit", "lr_scheduler_type": "cosine", "learning_rate": 2.0e-2},
    },
    "limited": {"method": "lora", "training": {"save_steps": 1, "save_total_limit": 2}},
    "no-room": {"method": "full"},
    "lora-again": {"method": "lora", "training": {"gradient_accumulation_steps": 2}},
    "diverges": {
        "method": "full",
        "training": {"learning_rate": 1.0e3},
        "divergence": {"factor": 3.0, "warmup_steps": 1},
    },
    # logging_nan_inf_filter would average a NaN away in the log; the guard sees the raw loss
    "overflows": {
        "method": "full",
        "training": {"learning_rate": 1.0e38, "max_grad_norm": 0.0, "logging_nan_inf_filter": True},
    },
    "best": {
        "method": "lora",
        "training": {
            "eval_strategy": "steps",
            "load_best_model_at_end": True,
            "learning_rate": 5.0e-2,
            "save_total_limit": 1,
        },
    },
}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("methods"), raw_config(EXPERIMENTS))


@pytest.fixture(scope="module")
def trained(ws: Workspace) -> dict[str, dict]:
    return {name: ws.train(name) for name in ("full", "lora", "qlora", "adalora")}


def probe_batch(ws: Workspace) -> dict:
    tokenizer = models.load_tokenizer(str(ws.base))
    texts = ["Map these headers to fields: Veh. Type, EF (g/km)", "排放标准 and speed"]
    return tokenizer(texts, return_tensors="pt", padding=True)


def logits_of(model, batch: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "adalora"])
def test_method_trains_and_merges_into_the_model_it_trained(ws, trained, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    metrics = trained[method]
    assert metrics["status"] == "ok" and metrics["steps"] == 4 and metrics["resumed_from_step"] == 0
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in metrics["losses"])
    stage = ws.stage_dir(method)
    merged_dir = ws.merge(method)
    batch = probe_batch(ws)
    merged = logits_of(AutoModelForCausalLM.from_pretrained(merged_dir), batch)

    if method == "full":
        assert metrics["trainable_parameters"] == metrics["total_parameters"]
        trained_model = AutoModelForCausalLM.from_pretrained(stage / "model")
        assert not (stage / "adapter").exists()
        # merged/ holds the trained weights themselves: bit-identical logits
        assert torch.equal(merged, logits_of(trained_model, batch))
        return

    assert 0 < metrics["trainable_parameters"] < metrics["total_parameters"] / 10
    # base + adapter, unmerged, in fp32; for QLoRA the base it was trained on
    # was 4-bit, and merge.py merges into the unquantized base instead
    reference = PeftModel.from_pretrained(models.load_model(str(ws.base), attention="sdpa"), stage / "adapter")
    expected = logits_of(reference, batch)
    # Merging folds B·A·scale into W: the same sums in another order, so fp32
    # rounding only (logits here are O(1)-O(10); 1e-4 is ~100 ulps).
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(
        expected, logits_of(models.load_model(str(ws.base), attention="sdpa"), batch), atol=1e-3
    ), "the adapter changed nothing"

    if method == "qlora":
        assert metrics["quantization"]["quant_type"] == "nf4"
        quantized = models.load_model(str(ws.base), quantization=metrics["quantization"], attention="sdpa")
        as_trained = logits_of(PeftModel.from_pretrained(quantized, stage / "adapter"), batch)
        # 4-bit rounding of the base weights is what separates the merged model
        # from the one QLoRA trained: a bounded, non-zero difference.
        gap = (merged - as_trained).abs().max().item()
        assert 0 < gap < 0.5 * merged.abs().max().item(), gap


def test_qlora_trains_4bit_layers_with_checkpointing(ws, trained):
    import bitsandbytes as bnb

    config = json.loads((ws.results / "qlora" / "config.json").read_text())
    assert config["stages"][0]["training"]["activation_checkpointing"] is True
    model, _, _ = setup_for_training(StageSpec.from_json(config["stages"][0]), str(ws.base), None, "cpu")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    # what trains is the LoRA pair on each 4-bit layer, nothing of the base
    assert all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    assert trained["qlora"]["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_adalora_prunes_ranks_within_budget(ws, trained):
    metrics = trained["adalora"]
    info = metrics["adalora"]
    assert info["total_step"] == 4
    ranks = info["final_ranks"]
    assert len(ranks) > 1
    # target_r 2 per module x modules: the allocator's budget, met by its last mask
    assert info["target_budget"] == 2 * len(ranks)
    assert sum(ranks.values()) <= info["target_budget"]
    assert len(set(ranks.values())) > 1, f"uniform ranks: the allocator never ran ({ranks})"
    budgets = [entry["budget"] for entry in info["rank_budget"]]
    assert budgets[0] == 6 * len(ranks) and budgets[-1] == info["target_budget"]
    saved = json.loads((ws.stage_dir("adalora") / "adapter" / "adapter_config.json").read_text())
    kept = {name.split(".lora_E")[0]: sum(mask) for name, mask in saved["rank_pattern"].items()}
    assert sorted(kept.values()) == sorted(ranks.values())
    assert saved["total_step"] == 4


def test_adalora_loss_includes_orthogonality_penalty(ws):
    """FtflowTrainer's labelled-positions-only loss equals PEFT's own AdaLoRA loss (which adds the penalty)."""
    config = json.loads((ws.results / "adalora" / "config.json").read_text())
    stage = StageSpec.from_json(config["stages"][0])
    model, tokenizer, _ = setup_for_training(stage, str(ws.base), None, "cpu", total_step=4)
    train_data, _, _ = load_training_data([str(ws.results / "data" / stage.data_id)], stage, "adalora")
    from ftflow.packing import packing_collator

    collator = packing_collator()
    args = build_training_arguments(stage.training, stage.packing, str(ws.root / "unused"), False, "x", "cpu")
    trainer = FtflowTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=train_data,
        adalora_budget=adalora.AdaLoraBudgetCallback(model),
    )
    trainer.current_gradient_accumulation_steps = 1
    batch = collator([train_data[i] for i in range(4)])
    with torch.no_grad():
        # give A and B some non-orthogonality, so the penalty is far from zero
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.mul_(3.0)
        ours = trainer.compute_loss(model, dict(batch))
        theirs = model(**batch).loss
        plain = trainer.compute_loss(model, dict(batch)) - trainer.orthogonality_weight * adalora.orthogonality_penalty(
            model
        )
    assert float(ours - plain) > 0.1
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_same_seed_same_losses(ws, trained):
    again = ws.train("lora-again")
    assert [e["loss"] for e in again["losses"]] == [e["loss"] for e in trained["lora"]["losses"]]
    assert again["steps"] == 4 and again["tokens"] == trained["lora"]["tokens"]


@pytest.mark.parametrize(
    "experiment, reason", [("diverges", "exceeds 3 x starting loss"), ("overflows", "non-finite loss")]
)
def test_huge_learning_rate_diverges_and_saves_nothing(ws, experiment, reason):
    """A loss past factor x its start, or a NaN/inf one (never filtered out of the log), stops the stage."""
    metrics = ws.train(experiment)
    assert metrics["status"] == "diverged", metrics.get("losses")
    assert reason in metrics["reason"] and metrics["steps"] < 4, metrics["reason"]
    stage = ws.stage_dir(experiment)
    assert not (stage / "model").exists() and not (stage / "checkpoints").exists()
    merged = ws.merge(experiment)
    assert read_status(str(merged)) == "diverged"
    assert not list(merged.glob("*.safetensors"))


def test_load_best_model_at_end_saves_the_best_checkpoint(ws):
    from peft import PeftModel

    metrics = ws.train("best")
    evals = metrics["eval_losses"]
    assert [e["step"] for e in evals] == [2, 4]
    best = min(evals, key=lambda e: e["eval_loss"])
    assert metrics["best_checkpoint_step"] == best["step"]
    # the saved adapter scores the best evaluation loss on the validation split
    stage_config = StageSpec.from_json(json.loads((ws.results / "best" / "config.json").read_text())["stages"][0])
    _, validation, _ = load_training_data([str(ws.results / "data" / stage_config.data_id)], stage_config, "best")
    from ftflow.packing import packing_collator

    model = PeftModel.from_pretrained(models.load_model(str(ws.base)), ws.stage_dir("best") / "adapter")
    model.config.use_cache = False
    args = build_training_arguments(
        stage_config.training, stage_config.packing, str(ws.root / "unused-best"), True, "x", "cpu"
    )
    trainer = FtflowTrainer(model=model, args=args, data_collator=packing_collator(), eval_dataset=validation)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(best["eval_loss"], rel=1e-5)
    # evaluation is in TensorBoard under eval/
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(ws.stage_dir("best") / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 4]


def test_adalora_schedule_without_pruning_is_refused_before_any_job(tmp_path):
    """total_step from cheap row counts (a generator's `train`, a .jsonl's lines less held-out rows), no tokenization."""
    from ftflow.errors import ConfigError

    lines = "".join(
        json.dumps({"messages": [{"role": "user", "content": str(i)}, {"role": "assistant", "content": "x"}]}) + "\n"
        for i in range(30)
    )
    (tmp_path / "rows.jsonl").write_text(lines)

    def plan(dataset: str, tinit: int, tfinal: int):
        raw = raw_config(
            {"ada": {"method": "adalora", "dataset": dataset, "adalora": {"tinit": tinit, "tfinal": tfinal}}}
        )
        raw["smoke"] = False
        raw["datasets"]["local"] = {"source": "rows.jsonl", "kind": "chat", "splits": {"validation": 3, "test": 3}}
        raw["defaults"]["training"].update(max_steps=-1, num_train_epochs=2)
        return build_plan(raw, workdir=str(tmp_path), results=str(tmp_path / "results"))

    # 48 generated rows / batch 4 x 2 epochs = 24 steps
    with pytest.raises(ConfigError) as err:
        plan("colmap", tinit=10, tfinal=14)
    assert str(err.value).startswith("experiments.ada.adalora: the schedule has no budgeting phase")
    assert "tinit (10) >= total_step (24) - tfinal (14) = 10" in str(err.value)
    assert "at most 48 training rows of dataset 'colmap' / batch 4 / accumulation 1 x 2 epochs" in str(err.value)
    plan("colmap", tinit=9, tfinal=14)
    # 30 lines - 3 validation - 3 test = 24 rows / batch 4 x 2 epochs = 12 steps
    with pytest.raises(ConfigError, match=r"total_step \(12\)"):
        plan("local", tinit=6, tfinal=6)
    plan("local", tinit=5, tfinal=6)


def test_adalora_schedule_is_checked_again_with_the_exact_count():
    """Tokenization may drop rows: train time recounts and names the experiment and stage."""
    from types import SimpleNamespace

    from ftflow.errors import StageError

    args = SimpleNamespace(
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=3.0,
        max_steps=-1,
        dataloader_drop_last=False,
    )
    stage = SimpleNamespace(name="s1", adalora={"tinit": 5, "tfinal": 6})
    assert adalora.check_schedule("exp", stage, 40, args) == 15  # ceil(40/4)=10 batches -> 5 steps x 3
    with pytest.raises(StageError) as err:
        adalora.check_schedule("exp", stage, 20, args)  # 5 batches -> 3 steps x 3 = 9
    assert "experiment 'exp', stage 's1': adalora: the schedule has no budgeting phase" in str(err.value)
    assert "tinit (5) >= total_step (9) - tfinal (6)" in str(err.value)
    assert "total_step 9 comes from 20 training examples / batch 4 / accumulation 2 x 3 epochs" in str(err.value)


def test_checkpoints_obey_save_total_limit(ws, monkeypatch):
    import ftflow.train

    kept: list[list[str]] = []
    rmtree = ftflow.train.shutil.rmtree

    def keep_checkpoints(path, *args, **kwargs):  # the finished stage's clean-up would hide them
        if os.path.basename(str(path)) == "checkpoints":
            kept.append(sorted(os.listdir(path)))
            return
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ftflow.train.shutil, "rmtree", keep_checkpoints)
    metrics = ws.train("limited")
    assert metrics["status"] == "ok" and metrics["steps"] == 4
    # four checkpoints were saved (save_steps: 1), the two newest are kept
    assert len(kept) == 1 and [name for name in kept[0] if name.startswith("checkpoint-")] == [
        "checkpoint-3",
        "checkpoint-4",
    ], kept


def test_a_full_disk_stops_the_stage_before_it_writes(ws, monkeypatch):
    import shutil

    import ftflow.disk
    from ftflow.errors import StageError

    usage = shutil.disk_usage(ws.root)
    # room for the 4-step run's checkpoints of a tiny model? no: 1 MiB free
    monkeypatch.setattr(ftflow.disk.shutil, "disk_usage", lambda path: usage._replace(free=2**20))
    with pytest.raises(StageError) as caught:
        ws.train("no-room")
    message = str(caught.value)
    assert message.startswith("experiment 'no-room', stage 'train': not enough free space to save checkpoint-2"), (
        message
    )
    assert "GiB free" in message and "save_total_limit" in message
    stage = ws.stage_dir("no-room")
    assert not (stage / "model").exists() and not (stage / "train_metrics.json").exists()
    assert not (stage / "checkpoints" / "checkpoint-2").exists()


# Per-step training losses of the four smoke runs above, pinned (as torchtune pins its
# recipes' losses): a change in data, masking, loss, optimizer or schedule that moves any
# of them fails here even when every run still "trains". Regenerate only for a change
# that is meant to alter training, and say so in its commit.
# A random smoke model starts near ln(vocab) = 10.8; AdaLoRA's loss adds PEFT's orthogonality penalty.
PINNED_LOSSES = {
    "full": [10.806884765625, 10.816864013671875, 10.783585548400879, 10.791086196899414],
    "lora": [10.819374084472656, 10.814348220825195, 10.810163497924805, 10.835860252380371],
    "qlora": [10.808018684387207, 10.825451850891113, 10.800111770629883, 10.814221382141113],
    "adalora": [11.995641708374023, 11.929915428161621, 11.783882141113281, 11.714254379272461],
}


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "adalora"])
def test_smoke_losses_are_pinned(trained, method):
    losses = [entry["loss"] for entry in trained[method]["losses"]]
    assert losses == pytest.approx(PINNED_LOSSES[method], rel=1e-5)
