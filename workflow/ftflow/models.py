"""Loading prepared models and their tokenizers, and picking the device.

Every job that needs weights or a tokenizer goes through here, so the
tokenize, train, merge and eval jobs agree on how a prepared folder is read
(safetensors only, remote code only when the model's spec allows it).
"""

from __future__ import annotations

import os

import torch

from .atomic import read_json
from .packing import pick_attention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_meta(model_dir: str) -> dict:
    """ftflow's metadata of a prepared model (trust_remote_code lives here)."""
    from .prepare import META_FILE  # prepare imports nothing of ftflow's jobs back

    path = os.path.join(model_dir, META_FILE)
    return read_json(path) if os.path.exists(path) else {}


def trust_remote_code(model_dir: str) -> bool:
    return bool(model_meta(model_dir).get("spec", {}).get("trust_remote_code", False))


def load_model(
    model_dir: str,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    quantization: dict | None = None,
    attention: str | None = None,
):
    """The causal LM in `model_dir`; 4-bit through bitsandbytes when `quantization` (a stage's section) is given."""
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
    """The tokenizer of a prepared model (or of an adapter folder), with a pad token.

    Tokenization and training load it the same way. A tokenizer without a pad
    token gets its eos as pad: that adds no token and changes no id (the vocab
    and `len(tokenizer)` stay as they are), it only lets the padding collator
    and batched generation fill rows; the labels mask pads out anyway.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code(model_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
