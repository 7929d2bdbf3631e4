"""GPU: the training comparison on a random-initialised Qwen3-0.6B-shaped model in bf16.

Runs only with `ftflow bench --gpu` on a machine with CUDA; anywhere else the
results say why it was skipped. The model has Qwen3-0.6B's architecture
(28 layers, hidden 1024, 16 query / 8 key-value heads of 128, MLP 3072,
151,936-token vocabulary, tied embeddings) with random weights, so nothing is
downloaded; it reads the embedded tokenizer's ids, which all lie inside its
vocabulary. Both sides train in bf16 on the same examples as the CPU
comparison, for full fine-tuning, LoRA and QLoRA, and report peak GPU memory
(torch.cuda.max_memory_allocated). TRL's SFTTrainer (trl_side, padding-free,
bf16 like ftflow's side) then trains the same model, examples and settings,
LoRA and full, in as many rounds as ftflow's side; on a GPU its fused LM head
projects only the positions that predict a label, as ftflow's loss does.
"""

from __future__ import annotations

import dataclasses
import os
import statistics

from .flops import matmul_peak
from .train_throughput import compare_training, summarize_training

# Qwen3-0.6B's config.json, the fields that set its shape and numerics
QWEN3_0_6B = dict(
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
GPU_STEPS = 20  # optimizer steps per run: a GPU step takes tens of milliseconds
GPU_METHODS = ("lora", "full", "qlora")
GPU_PEER_METHODS = ("lora", "full")


def skip_reason(requested: bool) -> str | None:
    """Why the GPU section does not run here, or None when it does."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device on this machine"
    if not requested:
        return "not requested: run `ftflow bench --gpu` on a CUDA machine"
    return None


def random_qwen3(folder: str, tokenizer_dir: str, sizes: dict | None = None) -> str:
    """A Qwen3-0.6B-shaped model with random bf16 weights and the embedded tokenizer, saved once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..atomic import atomic_dir

    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(
        "qwen3",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **(sizes or QWEN3_0_6B),
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return folder


def bench_gpu(
    inputs, settings, run_task, requested: bool, log=print, device: str = "cuda", sizes: dict | None = None
) -> dict:
    """The training comparison per method on the Qwen3-0.6B shape, bf16; or why it was skipped.

    `device` and `sizes` exist so the same code can be exercised on a CPU with a tiny shape.
    """
    reason = skip_reason(requested) if device == "cuda" else None
    if reason:
        return {"skipped": reason}
    model_dir = random_qwen3(
        os.path.join(inputs.work, "gpu", "qwen3-0.6b-random" if sizes is None else "qwen3-tiny-random"),
        inputs.model_dir,
        sizes,
    )
    peak = matmul_peak(
        size=8192 if device == "cuda" else settings.matmul_size,
        repeats=settings.matmul_repeats,
        dtype="bfloat16",
        device=device,
    )
    steps = GPU_STEPS if device == "cuda" else settings.train_steps
    gpu_settings = dataclasses.replace(settings, train_steps=steps)
    runs = compare_training(
        inputs, gpu_settings, run_task, methods=GPU_METHODS, device=device, model_dir=model_dir, bf16=True, log=log
    )
    training = summarize_training(runs, peak["gflops"])
    trl = trl_on_gpu(inputs, gpu_settings, run_task, model_dir, device, training, log)
    memory = {
        method: {side: result[side].get("peak_gpu_mb") for side in ("baseline", "ftflow")}
        for method, result in training.items()
    }
    return {
        "model": "Qwen3-0.6B architecture, random weights, bf16",
        "device": device,
        "matmul_peak": peak,
        "steps": steps,
        "train": training,
        "peak_gpu_mb": memory,
        "trl": trl,
    }


def trl_on_gpu(inputs, settings, run_task, model_dir: str, device: str, training: dict, log=print) -> dict:
    """{method: TRL's runs and ftflow's ratios to them} on the GPU section's model, examples and settings."""
    out = {}
    for method in GPU_PEER_METHODS:
        runs = []
        for round_index in range(settings.train_rounds):
            run = run_task(
                "peers.trl",
                model_dir=model_dir,
                data_dir=inputs.data_dir,
                data_spec=inputs.data_spec,
                workdir=inputs.work,
                stage=inputs.stage,
                method=method,
                steps=settings.train_steps,
                out_dir=os.path.join(inputs.work, "gpu", f"trl-{method}"),
                device=device,
                bf16=True,
            )
            log(f"gpu {method} trl round {round_index + 1}: {run['useful_tokens_per_second']:.1f} useful tokens/s")
            runs.append(run)
        ours = training[method]["ftflow"]
        ours_loss = statistics.median(r["train_loss"] for r in ours["runs"])
        speed = statistics.median(r["useful_tokens_per_second"] for r in runs)
        peak = max((r.get("peak_gpu_mb") or 0) for r in runs) or None
        loss = statistics.median(r["train_loss"] for r in runs)
        out[method] = {
            "useful_tokens_per_second": speed,
            "peak_gpu_mb": peak,
            "train_loss": loss,
            "speedup": round(ours["useful_tokens_per_second"] / speed, 3),
            "memory_ratio": round(ours["peak_gpu_mb"] / peak, 3) if peak and ours.get("peak_gpu_mb") else None,
            "train_loss_gap": round(ours_loss - loss, 6),
            "labels": runs[0]["labels"],
            "versions": runs[0]["versions"],
            "runs": runs,
        }
    return out
