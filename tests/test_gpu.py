"""What only a CUDA machine can check: bf16 LoRA and full fine-tuning, QLoRA with the bitsandbytes
CUDA kernels and its merge, paged AdamW, packed attention on CUDA kernels, and the GPU slot
allocator handing out real devices.

Marked `gpu`. Without CUDA every test here is skipped, unless FTFLOW_REQUIRE_GPU=1 (set by
`make gpu-check`), which turns a missing device into a failure: on the machine meant to run
them they never pass by skipping. Run: `make gpu-check` (bench/gpu_check.sh).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from helpers import REPO, Workspace, raw_config, tiny_llama

pytestmark = pytest.mark.gpu

BF16 = {"bf16": True}
EXPERIMENTS = {
    "lora-bf16": {"method": "lora", "training": BF16},
    "full-bf16": {"method": "full", "training": {**BF16, "learning_rate": 1.0e-4}},
    "qlora-nf4": {
        "method": "qlora",
        "quantization": {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"},
        "training": BF16,
    },
    "lora-paged-adamw": {"method": "lora", "training": {**BF16, "optim": "paged_adamw_8bit"}},
}


@pytest.fixture(scope="module", autouse=True)
def cuda():
    if torch.cuda.is_available():
        return
    if os.environ.get("FTFLOW_REQUIRE_GPU") == "1":
        pytest.fail(
            f"FTFLOW_REQUIRE_GPU=1 but torch {torch.__version__} sees no CUDA device "
            f"(CUDA build: {torch.version.cuda}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
        )
    pytest.skip("no CUDA device (FTFLOW_REQUIRE_GPU=1 makes this a failure)")


@pytest.fixture(scope="module")
def ws(tmp_path_factory, cuda) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("gpu"), raw_config(EXPERIMENTS))


@pytest.fixture(scope="module")
def trained(ws: Workspace) -> dict[str, dict]:
    return {name: ws.train(name) for name in EXPERIMENTS}


def probe_logits(model, ws: Workspace, device: str) -> torch.Tensor:
    from ftflow.models import load_tokenizer

    batch = load_tokenizer(str(ws.base))(
        ["Map these headers to fields: Veh. Type, EF (g/km)", "speed and load"], return_tensors="pt", padding=True
    ).to(device)
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float().cpu()


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_trains_on_cuda(trained, experiment):
    metrics = trained[experiment]
    assert metrics["status"] == "ok", metrics.get("reason")
    assert metrics["steps"] == 4
    losses = [entry["loss"] for entry in metrics["losses"]]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses))), losses
    assert metrics["provenance"]["device"]["cuda"] is True
    assert metrics["peak_gpu_mb"] > 0, "the stage trained on the GPU"


def test_bf16_stages_load_bf16_weights(ws, trained):
    from ftflow.model_setup import setup_for_training
    from ftflow.specs import ExperimentSpec

    for experiment in ("lora-bf16", "full-bf16"):
        stage = ExperimentSpec.read(str(ws.results / experiment / "config.json")).stages[0]
        model, _, _ = setup_for_training(stage, str(ws.base), None, "cuda")
        weights = [p for name, p in model.named_parameters() if "lora_" not in name]
        assert {p.dtype for p in weights} == {torch.bfloat16} and {p.device.type for p in weights} == {"cuda"}
        del model
        torch.cuda.empty_cache()


def test_qlora_uses_4bit_cuda_layers_and_merges_onto_the_dequantised_base(ws, trained):
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftflow import models

    metrics = trained["qlora-nf4"]
    assert metrics["quantization"]["quant_type"] == "nf4"
    quantized = models.load_model(str(ws.base), torch.bfloat16, "cuda", quantization=metrics["quantization"])
    layers = [m for m in quantized.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.device.type == "cuda" and m.weight.quant_state is not None for m in layers)
    as_trained = probe_logits(PeftModel.from_pretrained(quantized, ws.stage_dir("qlora-nf4") / "adapter"), ws, "cuda")

    merged = probe_logits(AutoModelForCausalLM.from_pretrained(ws.merge("qlora-nf4")).to("cuda"), ws, "cuda")
    base = probe_logits(models.load_model(str(ws.base), torch.float32, "cuda", attention="sdpa"), ws, "cuda")
    assert torch.isfinite(merged).all()
    assert not torch.allclose(merged, base, atol=1e-3), "the merged adapter changed nothing"
    # the merge folds the adapter into the unquantized base; QLoRA trained it over the 4-bit
    # base: 4-bit rounding (and bf16 matmuls) separate the two, boundedly
    gap = (merged - as_trained).abs().max().item()
    assert 0 < gap < 0.5 * merged.abs().max().item(), gap


def test_paged_adamw_moves_the_adapter(ws, trained):
    from safetensors.torch import load_file

    config = json.loads((ws.results / "lora-paged-adamw" / "config.json").read_text())
    assert config["stages"][0]["training"]["optim"] == "paged_adamw_8bit"
    assert trained["lora-paged-adamw"]["status"] == "ok"
    weights = load_file(str(ws.stage_dir("lora-paged-adamw") / "adapter" / "adapter_model.safetensors"))
    lora_b = [tensor for name, tensor in weights.items() if "lora_B" in name]
    # LoRA's B starts at zero: only optimizer steps make it non-zero
    assert lora_b and all(tensor.abs().sum() > 0 for tensor in lora_b)


# --------------------------------------------------------------------------- packed attention on CUDA

EXAMPLES = [[5, 17, 23, 42, 8], [9, 3], [77, 12, 64, 31, 2, 7, 19], [44, 45, 46]]


def cuda_attentions() -> list[str]:
    from ftflow.packing import PACKED_ATTENTION

    names = [PACKED_ATTENTION, "sdpa"]
    try:
        import flash_attn  # noqa: F401

        names.append("flash_attention_2")
    except ImportError:
        pass
    return names


@pytest.mark.parametrize("attention", cuda_attentions())
def test_packed_logits_equal_separate_runs_on_cuda(attention):
    from ftflow.packing import packing_collator

    dtype = torch.bfloat16 if attention == "flash_attention_2" else torch.float32  # flash-attention: half only
    model = tiny_llama(attention, use_cache=False).to("cuda", dtype)
    model.train()
    batch = packing_collator()([{"input_ids": ids, "labels": ids} for ids in EXAMPLES])
    batch.pop("labels")
    # cu_seq_lens_* are tensors, max_length_* plain ints
    packed = model(**{k: v.to("cuda") if torch.is_tensor(v) else v for k, v in batch.items()}).logits[0].float()
    starts = [sum(map(len, EXAMPLES[:i])) for i in range(len(EXAMPLES))]
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-4}
    for ids, start in zip(EXAMPLES, starts):
        alone = model(input_ids=torch.tensor([ids], device="cuda")).logits[0].float()
        torch.testing.assert_close(packed[start : start + len(ids)], alone, **tolerance)
    flat = model(input_ids=torch.tensor([[t for ids in EXAMPLES for t in ids]], device="cuda")).logits[0].float()
    second = model(input_ids=torch.tensor([EXAMPLES[1]], device="cuda")).logits[0].float()
    assert not torch.allclose(flat[starts[1] : starts[2]], second, atol=1e-3), "the check above can fail"


# --------------------------------------------------------------------------- GPU slots on real devices

# One job: take a slot of the machine's real GPUs (nvidia-smi -L), record what torch sees in it.
JOB = textwrap.dedent(
    """
    import json, os, sys, time
    from ftflow.gpu_slots import gpus_for_job
    hold, record = float(sys.argv[1]), sys.argv[2]
    with gpus_for_job(1, f"gpu test {os.getpid()}", poll_seconds=0.05) as slots:
        start = time.monotonic()
        import torch
        seen = {"count": torch.cuda.device_count(), "name": torch.cuda.get_device_name(0)}
        torch.ones(1, device="cuda")  # a context on the device it holds
        time.sleep(hold)
        end = time.monotonic()
    with open(record, "w") as out:
        json.dump({"devices": slots.devices, "visible": os.environ["CUDA_VISIBLE_DEVICES"], "start": start,
                   "end": end, **seen}, out)
    """
)


def test_slots_hand_out_real_devices(tmp_path: Path):
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
    env = {k: v for k, v in os.environ.items() if k not in ("FTFLOW_GPUS", "CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID")}
    env.update(PYTHONPATH=str(REPO / "workflow"), FTFLOW_GPU_SLOTS_DIR=str(tmp_path / "slots"))
    jobs = []
    for name in ("first", "second"):
        record = tmp_path / f"{name}.json"
        jobs.append((subprocess.Popen([sys.executable, "-c", JOB, "3", str(record)], env=env), record))
        time.sleep(0.5)
    for proc, _ in jobs:
        assert proc.wait(timeout=300) == 0
    first, second = (json.loads(record.read_text()) for _, record in jobs)
    for job in (first, second):
        assert job["count"] == 1, "a job sees exactly the device it holds"
        assert job["visible"] == job["devices"][0] and f"GPU {job['visible']}: {job['name']}" in listing, listing
    overlapping = first["start"] < second["end"] and second["start"] < first["end"]
    # two devices or more: side by side on distinct devices; one device: one job after the other
    if overlapping:
        assert first["devices"] != second["devices"]
    if len(listing.strip().splitlines()) == 1:
        assert not overlapping and first["devices"] == second["devices"] == ["0"]
