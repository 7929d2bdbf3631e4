"""What a job process imports before it works: jobs that train nothing import no torch, and
bitsandbytes is imported only by the jobs that use it (ftflow/optional_imports.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ftflow.optional_imports import uses_bitsandbytes
from helpers import REPO

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "datasets")


def loaded_after(code: str) -> dict:
    """Run `code` in a fresh interpreter; {heavy package: imported?} and the code's `result`."""
    script = (
        "import json, sys\nresult = None\n"
        + code
        + f"\nprint(json.dumps({{'loaded': {{m: sys.modules.get(m) is not None for m in {HEAVY!r}}}, 'result': result}}))"
    )
    env = {"PYTHONPATH": str(REPO / "workflow"), "PATH": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_command_line_and_the_jobs_that_train_nothing_import_no_torch():
    out = loaded_after("import ftflow.cli, ftflow.config, ftflow.data, ftflow.prepare, ftflow.report, ftflow.status")
    assert not any(out["loaded"].values()), out["loaded"]


def test_hidden_bitsandbytes_looks_absent_to_peft_and_transformers():
    out = loaded_after(
        "from ftflow.optional_imports import hide_bitsandbytes\n"
        "hidden = hide_bitsandbytes()\n"
        "import peft, transformers.utils\n"
        "from peft.import_utils import is_bnb_available\n"
        "result = [hidden, is_bnb_available(), transformers.utils.is_bitsandbytes_available()]"
    )
    assert out["result"] == [True, False, False]
    assert out["loaded"]["peft"] and not out["loaded"]["bitsandbytes"]


@pytest.mark.parametrize(
    "quantized, optim, expected",
    [
        (True, None, True),  # QLoRA: 4-bit weights
        (False, "paged_adamw_8bit", True),
        (False, "adamw_bnb_8bit", True),
        (False, "adamw_torch", False),
        (False, None, False),
    ],
)
def test_only_qlora_and_bitsandbytes_optimizers_use_it(quantized, optim, expected):
    assert uses_bitsandbytes(quantized, optim) is expected


def test_spec_files_are_rewritten_only_when_their_content_changes(tmp_path):
    """The planner rewrites a spec (and so re-runs its jobs) only on a real change; 1 and 1.0 differ."""
    from ftflow.atomic import write_if_changed

    path = str(tmp_path / "spec.json")
    assert write_if_changed(path, {"b": [1, 2], "a": 1.0, "name": "排放"})
    text = (tmp_path / "spec.json").read_text(encoding="utf-8")
    assert text.startswith('{\n  "a": 1.0,') and "排放" in text  # sorted, indented, unicode kept
    assert not write_if_changed(path, {"name": "排放", "a": 1.0, "b": (1, 2)})
    assert write_if_changed(path, {"b": [1, 2], "a": 1, "name": "排放"})
    (tmp_path / "spec.json").write_text("{not json", encoding="utf-8")
    assert write_if_changed(path, {"a": 1})
