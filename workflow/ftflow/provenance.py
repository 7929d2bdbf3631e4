"""Where a result came from: code version, packages, config hash, device, and host or image."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess

from . import __version__
from .container import runtime

PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "datasets",
    "accelerate",
    "bitsandbytes",
    "evaluate",
    "tokenizers",
    "safetensors",
    "snakemake",
)


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """Commit of the ftflow checkout this code runs from, with '+dirty' for local edits."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_info() -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return info


def provenance(config_hash: str | None) -> dict:
    return {
        "ftflow_version": __version__,
        "git_commit": git_commit(),
        "packages": package_versions(),
        "config_hash": config_hash,
        "device": device_info(),
        "runtime": runtime(),  # the host, or the image with its SHA-256 and lock hash (ftflow.container)
    }
