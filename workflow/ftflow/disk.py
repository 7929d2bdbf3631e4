"""Free-space checks before large writes.

A full model or a checkpoint written onto a nearly full disk fails half-way
and leaves a truncated file behind; the atomic write keeps such a file from
being accepted, but the user is then told about an OSError deep in
safetensors. ftflow estimates what it is about to write and stops first,
saying how much is needed and how much is free.
"""

from __future__ import annotations

import os
import shutil

import torch

from .errors import FtflowError

MARGIN_BYTES = 64 * 2**20  # config files, tokenizer, file system overhead


def tensor_bytes(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Bytes of the model's parameters and buffers, tied weights counted once."""
    seen: set[int] = set()
    total = 0
    tensors = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    if not trainable_only:
        tensors += list(model.buffers())
    for t in tensors:
        key = t.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def checkpoint_bytes(model: torch.nn.Module, full: bool) -> int:
    """A Trainer checkpoint: the saved weights plus AdamW's two fp32 moments per trainable parameter."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return tensor_bytes(model, trainable_only=not full) + 2 * 4 * trainable


def nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def require_free_space(folder: str, needed: int, what: str) -> None:
    """Raise FtflowError unless the file system holding `folder` has room for `needed` bytes."""
    free = shutil.disk_usage(nearest_existing(folder)).free
    if free < needed + MARGIN_BYTES:
        raise FtflowError(
            f"not enough free space to save {what} in {folder}: about {_gib(needed + MARGIN_BYTES)} needed, "
            f"{_gib(free)} free (free some space, lower training.save_total_limit, or move results/ to a larger "
            "disk with snakemake --directory)"
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
