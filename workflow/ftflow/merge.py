"""merge: the stage's final model as one HF folder that AutoModelForCausalLM loads.

What the stage produced decides how (methods.METHODS[method].artifact):
  adapter   `merge_and_unload` into the stage's base weights; a quantized
            method's base is loaded *unquantized* in the compute dtype and the
            adapter merged into it (merging into 4-bit weights loses quality)
  model     the trained weights, hard-linked
A stage that did not finish ok gets a placeholder folder holding only its
status (status.py), which no later step mistakes for a model.
"""

from __future__ import annotations

import os
import shutil

import torch

from . import disk
from .atomic import atomic_dir, read_json, write_json
from .errors import in_stage
from .methods import METHODS
from .models import DTYPES, load_model, load_tokenizer
from .paths import stage_dir_of
from .status import write_status_dir

MERGE_FILE = "ftflow_merge.json"


def merge_stage(metrics_path: str, base_dir: str, out: str) -> dict:
    """Merge the stage whose train_metrics.json is `metrics_path` into `out`."""
    metrics = read_json(metrics_path)
    method = METHODS[metrics["method"]]
    artifact = os.path.join(stage_dir_of(metrics_path), method.artifact)
    info = {"experiment": metrics["experiment"], "stage": metrics["stage"], "method": metrics["method"]}
    with atomic_dir(out) as tmp:
        if metrics["status"] != "ok":
            write_status_dir(tmp, metrics["status"], metrics.get("reason", ""))
            return {**info, "status": metrics["status"]}
        if method.adapter:
            with in_stage(metrics["experiment"], metrics["stage"]):
                merge_adapter(base_dir, artifact, tmp, merge_dtype(metrics) if method.quantized else torch.float32)
        else:
            link_model(artifact, tmp)
        write_json(os.path.join(tmp, MERGE_FILE), {**info, "status": "ok", "base": os.path.abspath(base_dir)})
    return {**info, "status": "ok"}


def write_failed_merge(out: str, reason: str) -> None:
    """A search trial's merge that raised: a placeholder folder saying `failed` and why (never a model)."""
    with atomic_dir(out) as tmp:
        write_status_dir(tmp, "failed", f"merge: {reason}")


def merge_dtype(metrics: dict) -> torch.dtype:
    """The compute dtype a quantized stage trained in (train records its quantization section)."""
    compute = (metrics.get("quantization") or {}).get("compute_dtype", "float32")
    return DTYPES.get(compute, torch.float32)


def link_model(src: str, out: str) -> None:
    """Full weights as they are: hard links where the file system allows, copies elsewhere."""
    for entry in os.listdir(src):
        try:
            os.link(os.path.join(src, entry), os.path.join(out, entry))
        except OSError:
            shutil.copy2(os.path.join(src, entry), os.path.join(out, entry))


def merge_adapter(base_dir: str, adapter_dir: str, out: str, dtype: torch.dtype) -> None:
    from peft import PeftModel

    from .prepare import META_FILE  # prepare imports nothing of merge back

    base = load_model(base_dir, dtype, "cpu", attention="sdpa")
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    disk.require_free_space(out, disk.tensor_bytes(merged), "the merged model")
    merged.save_pretrained(out, safe_serialization=True)
    load_tokenizer(adapter_dir).save_pretrained(out)
    meta = os.path.join(base_dir, META_FILE)
    if os.path.exists(meta):
        shutil.copy2(meta, os.path.join(out, META_FILE))
