"""Content hashes of JSON-like values: the names of data folders and the freshness of outputs.

A leaf module (standard library only) shared by the planner and the jobs: the
planner hashes a resolved config into `data_id` and `config_hash`, the jobs
hash the config they ran with into their outputs, and the two must agree.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(data: Any) -> str:
    """One spelling per value: sorted keys, no spaces, unicode kept, unknown types as str."""
    return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def content_hash(data: Any, length: int = 16) -> str:
    """The first `length` hex digits of the SHA-256 of `canonical_json(data)`."""
    return hashlib.sha256(canonical_json(data).encode("utf-8")).hexdigest()[:length]
