"""The machine's measured matmul peak, and the FLOPs a training step must do.

Accounting (multiply-add = 2 FLOPs; the dense matmuls only):
  forward              2 x weights per token through each linear layer
  backward, trained    4 x weights (activation gradient + weight gradient)
  backward, frozen     2 x weights (activation gradient only: LoRA's base weights)
  LM head              counted only at positions that get logits
Not counted: attention scores (QK^T and AV, about 3% of the total at ~100-token
examples, 8% at 256), norms, activations, the embedding lookup, the optimizer.
"""

from __future__ import annotations

import time

import torch


def matmul_peak(size: int = 2048, repeats: int = 10, dtype: str = "float32", device: str | None = None) -> dict:
    """Best GFLOP/s of `repeats` (size x size) @ (size x size) matmuls in `dtype` on this CPU/GPU."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kind = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device, kind)
    b = torch.randn(size, size, generator=generator).to(device, kind)
    out = torch.empty(size, size, device=device, dtype=kind)
    torch.mm(a, b, out=out)  # warm-up: thread pool and kernel selection
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        torch.mm(a, b, out=out)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return {
        "gflops": round(2 * size**3 / best / 1e9, 2),
        "matrix": size,
        "dtype": dtype,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "device": device,
        "allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32) if device == "cuda" else None,
    }


def linear_weights(model) -> dict:
    """Weights of the model's linear layers, in three groups: body, LoRA adapter, LM head.

    Counted as in_features x out_features, so a 4-bit layer (packed storage)
    counts the matmul it performs.
    """
    counts = {"body": 0, "adapter": 0, "head": 0}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        size = module.in_features * module.out_features
        parts = name.split(".")
        if parts[-1] == "lm_head":
            counts["head"] += size
        elif "lora_A" in parts or "lora_B" in parts:
            counts["adapter"] += size
        else:
            counts["body"] += size
    return counts


def training_flops(weights: dict, method: str, tokens: int, logit_positions: int) -> float:
    """FLOPs of one pass forward and backward over `tokens` tokens with logits at `logit_positions`."""
    if method == "full":
        per_token = 6 * weights["body"]
        per_logit = 6 * weights["head"]
    else:  # frozen base (LoRA, QLoRA): activation gradients only, plus the trained adapter
        per_token = 4 * weights["body"] + 6 * weights["adapter"]
        per_logit = 4 * weights["head"]
    return float(per_token * tokens + per_logit * logit_positions)
