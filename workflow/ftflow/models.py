"""Loading models for each method, building PEFT configs, and reading stage outputs."""

from __future__ import annotations

import json
import logging
import os

import torch

from .atomic import read_json
from .errors import StageError
from .packing import pick_attention

log = logging.getLogger("ftflow.models")

STATUS_FILE = "ftflow_status.json"  # in a merged/ folder that holds no model (diverged upstream)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def read_status(model_dir: str) -> str:
    """'ok' for a folder with weights; the recorded status for a placeholder folder."""
    path = os.path.join(model_dir, STATUS_FILE)
    if os.path.exists(path):
        return read_json(path).get("status", "failed")
    return "ok"


def model_meta(model_dir: str) -> dict:
    """ftflow's metadata of a prepared model (trust_remote_code lives here)."""
    from .prepare import META_FILE

    path = os.path.join(model_dir, META_FILE)
    return read_json(path) if os.path.exists(path) else {}


def trust_remote_code(model_dir: str) -> bool:
    return bool(model_meta(model_dir).get("spec", {}).get("trust_remote_code", False))


def check_precision(stage: dict, device: str, experiment: str) -> None:
    training = stage["training"]
    for key in ("fp16", "bf16"):
        if training.get(key) and device == "cpu":
            raise StageError(
                experiment,
                stage["name"],
                f"training.{key}: mixed precision needs a GPU and none is visible here; remove it for CPU runs",
            )
    optim = str(training.get("optim", ""))
    if "paged" in optim or "bnb" in optim or "8bit" in optim:
        # bitsandbytes 0.50 runs its (paged) optimizers on the CPU too; paging is then a no-op.
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise StageError(
                experiment,
                stage["name"],
                f"training.optim {optim!r} is a bitsandbytes optimizer and bitsandbytes cannot be imported here ({err}); "
                "install bitsandbytes or use adamw_torch",
            ) from err


def load_model(model_dir: str, dtype: torch.dtype = torch.float32, device: str = "cpu", quantization: dict | None = None, attention: str | None = None):
    from transformers import AutoModelForCausalLM

    kwargs = dict(
        dtype=dtype,
        use_safetensors=True,  # never unpickle weights
        trust_remote_code=trust_remote_code(model_dir),
        attn_implementation=attention or pick_attention(device),
    )
    if quantization:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization["quant_type"],
            bnb_4bit_use_double_quant=quantization["double_quant"],
            bnb_4bit_compute_dtype=DTYPES[quantization["compute_dtype"]],
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()} if device == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if device == "cuda" and not quantization:
        model = model.to("cuda")
    return model


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code(model_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def training_dtype(stage: dict) -> torch.dtype:
    training = stage["training"]
    if training.get("bf16"):
        return torch.bfloat16
    return torch.float32  # fp16 trains with fp32 master weights under autocast


def build_peft_config(stage: dict, total_step: int | None = None):
    """The stage's PEFT config; AdaLoRA needs the run's optimizer step count (adalora.py)."""
    from peft import AdaLoraConfig, LoraConfig, TaskType

    if stage["method"] in ("lora", "qlora"):
        return LoraConfig(task_type=TaskType.CAUSAL_LM, **stage["lora"])
    if stage["method"] == "adalora":
        return AdaLoraConfig(task_type=TaskType.CAUSAL_LM, total_step=total_step, **stage["adalora"])
    raise ValueError(stage["method"])


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


def setup_for_training(stage: dict, base_dir: str, adapter_dir: str | None, device: str, total_step: int | None = None):
    """Model ready for the Trainer: full weights, or base (4-bit for QLoRA) + a trainable adapter.

    `adapter_dir` (init_from: adapter) continues the previous stage's adapter
    with its saved settings; an AdaLoRA adapter takes this stage's schedule.
    """
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    tokenizer = load_tokenizer(base_dir)
    method = stage["method"]
    quant = stage["quantization"] if method == "qlora" else None
    model = load_model(base_dir, training_dtype(stage), device, quantization=quant)
    model.config.use_cache = False  # packed rows must not share a KV cache
    training = stage["training"]
    if method == "qlora":
        # Casts the layers left unquantized (norms, embeddings, head) to fp32 and makes the
        # 4-bit model's inputs require grad; the Trainer turns on gradient checkpointing itself.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if method == "full":
        return model, tokenizer, count_parameters(model)
    if adapter_dir:
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
        if method == "adalora":
            from . import adalora

            adalora.refresh_for_new_stage(model, stage["adalora"], total_step)
    else:
        model = get_peft_model(model, build_peft_config(stage, total_step))
    if checkpoints_activations(training):
        model.enable_input_require_grads()  # with a frozen base, reentrant checkpointing needs an input that requires grad
    return model, tokenizer, count_parameters(model)


def load_training_data(data_dir: str, stage: dict, experiment: str):
    from datasets import load_from_disk

    def load(split):
        path = os.path.join(data_dir, split)
        if not os.path.isdir(path):
            return None
        ds = load_from_disk(path)
        keep = [c for c in ("input_ids", "labels", "length") if c in ds.column_names]
        return ds.select_columns(keep)

    train = load("train")
    evaluation = None
    if stage["training"].get("eval_strategy", "no") != "no":
        # Never the test split: choosing the best checkpoint on it would leak it into the scores.
        evaluation = load("validation")
        if evaluation is None or len(evaluation) == 0:
            raise StageError(experiment, stage["name"], f"training.eval_strategy: dataset {stage['dataset']!r} has no validation rows to evaluate on")
    return train, evaluation


def padding_collator(tokenizer):
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, pad_to_multiple_of=8)


def stage_fingerprint(experiment: dict, stage: dict) -> str:
    from .hashing import content_hash

    return content_hash({"stage": stage, "model": experiment["model"], "smoke": experiment.get("smoke")})


def write_status_dir(out: str, status: str, reason: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, STATUS_FILE), "w", encoding="utf-8") as handle:
        json.dump({"status": status, "reason": reason}, handle)
