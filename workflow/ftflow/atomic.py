"""Outputs appear complete or not at all.

Every output file and folder is written under a temporary name beside its
final path and renamed into place when complete: `rename` is atomic on one
file system, so a job killed at any point leaves either the old state or the
new one, never a half-written output that a later run would accept.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any, Iterator

from .hashing import canonical_json

TMP_MARK = ".tmp-"


def _tmp_name(path: str) -> str:
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(head, f"{TMP_MARK}{tail}.{os.getpid()}")


def clear_stale(path: str) -> None:
    """Remove temporaries of `path` left by killed jobs (any pid)."""
    head, tail = os.path.split(os.path.abspath(path))
    if not os.path.isdir(head):
        return
    prefix = f"{TMP_MARK}{tail}."
    for entry in os.listdir(head):
        if entry.startswith(prefix):
            victim = os.path.join(head, entry)
            if os.path.isdir(victim) and not os.path.islink(victim):
                shutil.rmtree(victim, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(victim)


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Yield a temporary folder; on success it replaces `path` in one rename."""
    clear_stale(path)
    tmp = _tmp_name(path)
    os.makedirs(tmp)
    try:
        yield tmp
        fsync_tree(tmp)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_tree(root: str) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _tmp_name(path)
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json(path: str, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def write_if_changed(path: str, data: Any) -> bool:
    """Write `data` as sorted, indented JSON unless the file already holds exactly that content.

    The planner rewrites spec files on every parse; leaving an unchanged file
    alone keeps its mtime, and the mtime is what tells Snakemake which jobs are
    out of date. Returns whether the file was written.
    """
    # Compared in canonical form (the C encoder; 1 and 1.0 differ), so that the indented text,
    # which only the slower pure-Python encoder writes, is made only for a file that changes:
    # a 500-experiment sweep re-plans in less time.
    try:
        with open(path, encoding="utf-8") as handle:
            if canonical_json(json.load(handle)) == canonical_json(data):
                return False
    except (FileNotFoundError, ValueError):  # missing, or not JSON: (re)write it
        pass
    write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n")
    return True


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
