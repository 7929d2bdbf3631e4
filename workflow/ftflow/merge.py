"""merge: the stage's final model as one HF folder that AutoModelForCausalLM loads.

LoRA/AdaLoRA: `merge_and_unload` into the stage's base weights. QLoRA: the base
is loaded *unquantized* in the compute dtype and the adapter merged into it
(merging into 4-bit weights loses quality). Full: the trained weights,
hard-linked. A stage that did not finish ok gets a placeholder folder holding
only its status, which no later step mistakes for a model.
"""

from __future__ import annotations

import os
import shutil

import torch

from . import disk, models
from .errors import in_stage
from .atomic import atomic_dir, read_json, write_json


def merge_stage(metrics_path: str, base_dir: str, out: str) -> dict:
    metrics = read_json(metrics_path)
    stage_dir = os.path.dirname(metrics_path)
    info = {"experiment": metrics["experiment"], "stage": metrics["stage"], "method": metrics["method"]}
    with atomic_dir(out) as tmp:
        if metrics["status"] != "ok":
            models.write_status_dir(tmp, metrics["status"], metrics.get("reason", ""))
            return {**info, "status": metrics["status"]}
        if metrics["method"] == "full":
            src = os.path.join(stage_dir, "model")
            for entry in os.listdir(src):
                try:
                    os.link(os.path.join(src, entry), os.path.join(tmp, entry))
                except OSError:
                    shutil.copy2(os.path.join(src, entry), os.path.join(tmp, entry))
        else:
            with in_stage(metrics["experiment"], metrics["stage"]):
                merge_adapter(base_dir, os.path.join(stage_dir, "adapter"), tmp, metrics)
        write_json(os.path.join(tmp, "ftflow_merge.json"), {**info, "status": "ok", "base": os.path.abspath(base_dir)})
    return {**info, "status": "ok"}


def merge_adapter(base_dir: str, adapter_dir: str, out: str, metrics: dict) -> None:
    from peft import PeftModel

    from .prepare import META_FILE

    dtype = torch.float32
    if metrics["method"] == "qlora":
        compute = (metrics.get("quantization") or {}).get("compute_dtype", "float32")
        dtype = models.DTYPES.get(compute, torch.float32)
    base = models.load_model(base_dir, dtype, "cpu", attention="sdpa")
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    disk.require_free_space(out, disk.tensor_bytes(merged), "the merged model")
    merged.save_pretrained(out, safe_serialization=True)
    models.load_tokenizer(adapter_dir).save_pretrained(out)
    meta = os.path.join(base_dir, META_FILE)
    if os.path.exists(meta):
        shutil.copy2(meta, os.path.join(out, META_FILE))
