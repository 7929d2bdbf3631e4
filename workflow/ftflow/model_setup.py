"""The model a stage trains: its weights loaded as the method wants, and an adapter on top.

What a method needs comes from its registry entry (methods.METHODS): whether
the base is loaded in 4 bits, which PEFT config class builds the adapter from
which config section, and whether that config gets the run's optimizer step
count (AdaLoRA's rank schedule is laid over it). A new method is an entry
there, not a branch here. Plain LoRA layers get ftflow.lora_forward's training
forward, which does less outside the matmuls on a CPU.
"""

from __future__ import annotations

import logging

import torch

from . import adalora
from .errors import StageError
from .gated_mlp import use_lean_mlp_forward
from .lora_forward import use_fast_lora_forward
from .models import load_model, load_tokenizer
from .optional_imports import uses_bitsandbytes
from .specs import StageSpec

log = logging.getLogger("ftflow.train")


def training_dtype(training: dict) -> torch.dtype:
    if training.get("bf16"):
        return torch.bfloat16
    return torch.float32  # fp16 trains with fp32 master weights under autocast


def check_precision(stage: StageSpec, device: str, experiment: str) -> None:
    """Refuse, before any weight is loaded, settings this machine cannot run."""
    training = stage.training
    for key in ("fp16", "bf16"):
        if training.get(key) and device == "cpu":
            raise StageError(
                experiment,
                stage.name,
                f"training.{key}: mixed precision needs a GPU and none is visible here; remove it for CPU runs",
            )
    optim = str(training.get("optim", ""))
    if uses_bitsandbytes(False, optim):
        # bitsandbytes 0.50 runs its (paged) optimizers on the CPU too; paging is then a no-op.
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise StageError(
                experiment,
                stage.name,
                f"training.optim {optim!r} is a bitsandbytes optimizer and bitsandbytes cannot be imported here ({err}); "
                "install bitsandbytes or use adamw_torch",
            ) from err


def build_peft_config(stage: StageSpec, total_step: int | None = None):
    """The stage's PEFT config: the method's config class over its section (+ total_step when it needs one)."""
    import peft

    info = stage.method_info
    settings = dict(getattr(stage, info.peft_section))
    if info.needs_total_step:
        settings["total_step"] = total_step
    return getattr(peft, info.peft_config)(task_type=peft.TaskType.CAUSAL_LM, **settings)


def checkpoints_activations(training: dict) -> bool:
    """Activation (gradient) checkpointing on? transformers 5 reads either name."""
    return bool(training.get("activation_checkpointing") or training.get("gradient_checkpointing"))


def count_parameters(model) -> dict:
    """Trainable and total parameters; PEFT counts a packed 4-bit weight as the values it holds."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    return {"trainable": int(trainable), "total": int(total)}


def setup_for_training(
    stage: StageSpec, base_dir: str, adapter_dir: str | None, device: str, total_step: int | None = None
):
    """(model, tokenizer, parameter counts) ready for the Trainer: full weights, or the base + a trainable adapter.

    `adapter_dir` (init_from: adapter) continues the previous stage's adapter
    with its saved settings; an adapter with a rank schedule takes this
    stage's schedule.
    """
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    info = stage.method_info
    tokenizer = load_tokenizer(base_dir)
    model = load_model(
        base_dir, training_dtype(stage.training), device, quantization=stage.quantization if info.quantized else None
    )
    model.config.use_cache = False  # packed rows must not share a KV cache
    lean = use_lean_mlp_forward(model)
    if lean:
        log.info("MLP: %d gated MLPs train with ftflow's lean CPU forward (ftflow.gated_mlp)", lean)
    if info.quantized:
        # Casts the layers left unquantized (norms, embeddings, head) to fp32 and makes the
        # 4-bit model's inputs require grad; the Trainer turns on gradient checkpointing itself.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if not info.adapter:
        return model, tokenizer, count_parameters(model)
    if adapter_dir:
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
        if info.needs_total_step:
            adalora.refresh_for_new_stage(model, getattr(stage, info.peft_section), total_step)
    else:
        model = get_peft_model(model, build_peft_config(stage, total_step))
    fast = use_fast_lora_forward(model)
    if fast:
        log.info(
            "LoRA: %d layers train with ftflow's CPU forward (ftflow.lora_forward); other devices run PEFT's", fast
        )
    if checkpoints_activations(stage.training):
        model.enable_input_require_grads()  # with a frozen base, reentrant checkpointing needs an input that requires grad
    return model, tokenizer, count_parameters(model)
