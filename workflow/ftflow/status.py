"""Status folders: a model folder that holds no model, and why.

A stage that did not finish ok (diverged, or its upstream did) still gets its
merged/ folder, so the DAG goes on and the report can say what happened; the
folder holds only STATUS_FILE. Every job that takes a model folder asks
`read_status` first and passes the status on instead of loading weights.
"""

from __future__ import annotations

import os

from .atomic import read_json, write_json

STATUS_FILE = "ftflow_status.json"


def read_status(model_dir: str) -> str:
    """'ok' for a folder with weights; the recorded status for a placeholder folder."""
    path = os.path.join(model_dir, STATUS_FILE)
    if os.path.exists(path):
        return read_json(path).get("status", "failed")
    return "ok"


def status_reason(model_dir: str) -> str | None:
    """Why a placeholder folder holds no model (None for a folder with weights)."""
    path = os.path.join(model_dir, STATUS_FILE)
    return read_json(path).get("reason") if os.path.exists(path) else None


def write_status_dir(out: str, status: str, reason: str) -> None:
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, STATUS_FILE), {"status": status, "reason": reason})
