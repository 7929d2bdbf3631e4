"""Fixtures, the hub kept offline, and the order test files run in; shared helpers are in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a hub: offline mode fails a hub lookup at once instead of after retries.
# Set before anything imports huggingface_hub (it reads these once), and inherited by the jobs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import helpers  # noqa: E402,F401  (puts workflow/ on sys.path for every test module)


@pytest.fixture(scope="session")
def embedded_tokenizer():
    from ftflow.prepare import embedded_tokenizer as load

    return load()


@pytest.fixture(scope="session")
def tokenizer_dir(embedded_tokenizer, tmp_path_factory) -> Path:
    """The embedded tokenizer saved as a folder: the model_dir of tokenize jobs that need no weights."""
    folder = tmp_path_factory.mktemp("tokenizer")
    embedded_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


# The longest test files first: `make test` hands whole files to its parallel workers in
# collection order, and a long file started last would run alone at the end.
LONGEST_FIRST = [
    "test_report_workflow.py",
    "test_harness.py",
    "test_crash_safety.py",
    "test_curricula.py",
    "test_workflow.py",
    "test_slurm.py",
    "test_bench.py",
    "test_poems_example.py",
    "test_embedded_model.py",
    "test_ddp.py",
    "test_bad_configs.py",
    "test_methods.py",
]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
