"""Untrusted inputs: no pickle weights, no remote code unless asked, no torch.load without weights_only."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ftflow.errors import FtflowError
from ftflow.prepare import prepare_model
from helpers import REPO


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )


def _spec(tmp_path: Path, folder: Path, **extra) -> Path:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model": {"name": "local", "path": str(folder), **extra}, "smoke": False}))
    return spec


def test_pickle_only_model_folder_is_refused_with_a_way_out(tmp_path):
    folder = tmp_path / "pickled"
    model = _tiny_llama()
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # the old pickle format
    assert (folder / "pytorch_model.bin").exists() and not list(folder.glob("*.safetensors"))
    with pytest.raises(FtflowError) as info:
        prepare_model(str(_spec(tmp_path, folder)), str(tmp_path / "out"))
    message = str(info.value)
    assert "pickle" in message and "safe_serialization=True" in message
    assert not (tmp_path / "out").exists(), "nothing half-written is left behind"


def test_safetensors_folder_is_prepared_without_pickles(tmp_path):
    folder = tmp_path / "mixed"
    _tiny_llama().save_pretrained(folder)  # safetensors
    torch.save({"x": torch.zeros(1)}, folder / "training_args.bin")
    prepare_model(str(_spec(tmp_path, folder)), str(tmp_path / "out"))
    prepared = {p.name for p in (tmp_path / "out").iterdir()}
    assert "model.safetensors" in prepared and "training_args.bin" not in prepared


def test_remote_code_is_not_run_unless_the_model_says_so(tmp_path):
    from ftflow.models import load_model

    folder = tmp_path / "custom"
    _tiny_llama().save_pretrained(folder)
    (folder / "modeling_custom.py").write_text(
        "from transformers import LlamaForCausalLM\n"
        "open(__file__ + '.ran', 'w').write('remote code ran')\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    pass\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    prepare_model(str(_spec(tmp_path, folder)), str(tmp_path / "prepared"))
    model = load_model(str(tmp_path / "prepared"))
    assert type(model).__name__ == "LlamaForCausalLM"  # the repository's own class was not imported
    assert not list(tmp_path.rglob("*.ran"))


def test_no_torch_load_without_weights_only():
    offenders = []
    for path in (REPO / "workflow" / "ftflow").rglob("*.py"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if re.search(r"torch\.load\(", line) and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(REPO)}:{number}")
    assert not offenders, offenders


def test_trust_remote_code_is_off_unless_the_config_sets_it():
    """A hub model's own Python code runs only when its config entry says so."""
    from ftflow.config import build_plan

    raw = {
        "models": {"plain": {"hub": "org/model"}, "trusted": {"hub": "org/other", "trust_remote_code": True}},
        "datasets": {"d": {"source": "hub:org/data", "kind": "text"}},
        "defaults": {"dataset": "d"},
        "experiments": {"a": {"model": "plain"}, "b": {"model": "trusted"}},
    }
    models = build_plan(raw).models
    assert models["plain"].trust_remote_code is False
    assert models["trusted"].trust_remote_code is True
