"""Data-parallel training for real: two gloo processes on the CPU through the train rule.

tests/configs/ddp.yaml trains the same LoRA stage twice: `single` on one
device with batch 4, `ddp` with `gpus: 2` (FTFLOW_GPUS=2 simulates two GPUs,
so the rule's `ftflow train --gpus 2` takes two slots and starts torchrun).
By the effective batch rule each process then runs batch 2, and an optimizer
step sees the same 4 examples as the single-device step: the loss curves and
the trained adapters must agree up to float summation order.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ftflow.gpu_slots import acquire_gpus
from helpers import REPO, copy_config, snakemake

pytestmark = pytest.mark.workflow


def test_two_process_training_matches_single_device(workdir):
    copy_config(REPO / "tests" / "configs" / "ddp.yaml", workdir)
    env = {"FTFLOW_GPUS": "2", "FTFLOW_GPU_SLOTS_DIR": str(workdir / "slots")}
    targets = ["results/single/train/train_metrics.json", "results/ddp/train/train_metrics.json"]
    snakemake(workdir, *targets, "--cores", "2", "--resources", "gpu=2", env=env, timeout=600)

    single = json.loads((workdir / targets[0]).read_text())
    ddp = json.loads((workdir / targets[1]).read_text())
    assert single["status"] == ddp["status"] == "ok"
    assert single["data_parallel"] == {
        "processes": 1,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "backend": None,
    }
    assert ddp["data_parallel"] == {
        "processes": 2,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "backend": "gloo",
    }
    assert ddp["steps"] == single["steps"] == 4
    # Both processes' batches are counted, and together they are the single run's batches.
    assert ddp["tokens"] == single["tokens"] and ddp["label_tokens"] == single["label_tokens"]
    single_losses = [entry["loss"] for entry in single["losses"]]
    ddp_losses = [entry["loss"] for entry in ddp["losses"]]
    assert len(ddp_losses) == 4
    assert ddp_losses == pytest.approx(single_losses, rel=1e-5)

    single_adapter = load_file(workdir / "results/single/train/adapter/adapter_model.safetensors")
    ddp_adapter = load_file(workdir / "results/ddp/train/adapter/adapter_model.safetensors")
    assert single_adapter.keys() == ddp_adapter.keys()
    for name, weight in single_adapter.items():
        torch.testing.assert_close(ddp_adapter[name], weight, rtol=1e-4, atol=1e-5)
    # One TensorBoard writer (rank 0's), and both slots free again once the job ended.
    assert len(list((workdir / "results/ddp/train/tb").iterdir())) == 1
    with acquire_gpus(2, "after the run", env=env, wait_seconds=0) as slots:
        assert slots.devices == ["0", "1"]
