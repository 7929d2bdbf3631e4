"""A LLaMA-Factory registry (dataset_info.json) as a source: its files train unchanged.

The registry and its files are written here in LLaMA-Factory's layout; the
planner reads the entry into ftflow settings and the tokenize job labels the
same positions as the same rows given with `format:` directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftflow.config.datasets import resolve_dataset
from ftflow.errors import ConfigError
from helpers import tokenize_dataset
from test_formats import ALPACA_ROWS, QWEN, SHAREGPT_TOOL_ROW, jsonl

REGISTRY = {
    "alpaca_demo": {"file_name": "alpaca_demo.jsonl"},
    "glaive_demo": {
        "file_name": "glaive_demo.jsonl",
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "tools": "tools"},
    },
    "c4_demo": {"file_name": "c4_demo.jsonl", "columns": {"prompt": "text"}},
    "chat_folder": {
        "file_name": "chats",
        "formatting": "sharegpt",
        "columns": {"messages": "messages"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    },
    "hub_entry": {"hf_hub_url": "org/alpaca_en", "subset": "default", "split": "train"},
    "dpo_demo": {"file_name": "dpo.jsonl", "ranking": True, "formatting": "sharegpt"},
    "kto_demo": {"file_name": "kto.jsonl", "formatting": "sharegpt", "columns": {"kto_tag": "label"}},
    "mllm_demo": {"file_name": "mllm.json", "formatting": "sharegpt", "columns": {"images": "images"}},
    "sampled": {"file_name": "alpaca_demo.jsonl", "num_samples": 100},
    "scripted": {"script_url": "some_script"},
}


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps(REGISTRY), encoding="utf-8")
    jsonl(data / "alpaca_demo.jsonl", ALPACA_ROWS)
    jsonl(data / "glaive_demo.jsonl", [SHAREGPT_TOOL_ROW])
    jsonl(data / "c4_demo.jsonl", [{"text": f"Document {i}."} for i in range(5)])
    (data / "chats").mkdir()
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    jsonl(data / "chats" / "part-1.jsonl", [chat])
    return tmp_path


def entry(registry: Path, name: str, **given):
    return resolve_dataset("d", {"source": f"llamafactory:data/dataset_info.json#{name}", **given}, str(registry))


def test_entries_become_ftflow_settings(registry):
    alpaca = entry(registry, "alpaca_demo")
    assert (alpaca.source, alpaca.kind, alpaca.format) == ("data/alpaca_demo.jsonl", "chat", "alpaca")
    glaive = entry(registry, "glaive_demo")
    assert (glaive.kind, glaive.format, glaive.messages_column) == ("chat", "sharegpt", "conversations")
    assert glaive.columns["tools"] == "tools"
    c4 = entry(registry, "c4_demo")  # LLaMA-Factory's pretraining layout: one `prompt` column of text
    assert (c4.kind, c4.text_column) == ("text", "text")
    folder = entry(registry, "chat_folder")
    assert folder.source == "data/chats/*" and folder.messages_column == "messages"
    assert (folder.tags["role_tag"], folder.tags["assistant_tag"], folder.tags["function_tag"]) == (
        "role",
        "assistant",
        "function_call",  # tags the entry leaves out keep their defaults
    )
    hub = entry(registry, "hub_entry")
    assert (hub.source, hub.subset, hub.hub_splits) == ("hub:org/alpaca_en", "default", {"train": "train"})
    # keys written in the config win over the entry's
    assert entry(registry, "alpaca_demo", max_length=64, mask_history=True).mask_history is True


@pytest.mark.parametrize(
    "name, expected",
    [
        ("dpo_demo", "the entry sets 'ranking': preference data"),
        ("kto_demo", "the entry maps a 'kto_tag' column: KTO labels are for KTO training"),
        ("mllm_demo", "the entry maps a 'images' column: ftflow trains text-only models"),
        ("sampled", "the entry sets 'num_samples': ftflow trains on every row of the file"),
        ("scripted", "the entry sets 'script_url': ftflow does not run dataset loading scripts"),
        ("missing", "data/dataset_info.json has no entry 'missing'"),
    ],
)
def test_what_ftflow_does_not_train_is_a_config_error(registry, name, expected):
    with pytest.raises(ConfigError) as info:
        entry(registry, name)
    assert str(info.value).startswith("datasets.d.source")
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def run_tokenize(workdir: Path, tokenizer_dir: Path, dataset: dict) -> dict:
    return tokenize_dataset(workdir, tokenizer_dir, dataset, out=f"out-{len(list(workdir.glob('out-*')))}")


def test_registry_files_tokenize_like_the_same_format_given_directly(registry, tokenizer_dir):
    source = "llamafactory:data/dataset_info.json#"
    via_registry = run_tokenize(registry, tokenizer_dir, {"source": source + "alpaca_demo"})
    direct = run_tokenize(registry, tokenizer_dir, {"source": "data/alpaca_demo.jsonl", "format": "alpaca"})
    assert (via_registry["rows_in"], via_registry["kept"]) == (7, 4)
    for key in ("rows_in", "kept", "dropped", "tokens", "label_tokens"):
        assert via_registry[key] == direct[key], key
    tools = run_tokenize(registry, tokenizer_dir, {"source": source + "glaive_demo", "chat_template": QWEN})
    assert (tools["rows_in"], tools["kept"]) == (1, 1) and tools["label_tokens"] > 0
    text = run_tokenize(registry, tokenizer_dir, {"source": source + "c4_demo", "max_length": 16})
    assert text["rows_in"] == 5 and text["tokens"] > 0
