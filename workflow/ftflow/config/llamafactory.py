"""A LLaMA-Factory dataset registry entry, read as ftflow dataset settings.

`source: "llamafactory:data/dataset_info.json#alpaca_zh_demo"` points at the
registry a LLaMA-Factory user already keeps. The entry's `file_name` (relative
to the registry's folder; a folder means every file in it), or its
`hf_hub_url` / `ms_hub_url`, becomes the source; `formatting`, `columns` and
`tags` become `format`, `columns` and `tags`; `subset` and `split` the hub
options. An alpaca entry whose only column is `prompt` is LLaMA-Factory's
pretraining layout: a text dataset on that column.

What ftflow does not train (preference pairs, KTO labels, images, video,
audio) or cannot read this way (a loading script, a cloud file, a hub
sub-folder, `num_samples` sampling) is a one-line config error naming the entry
and the key, never a silently different dataset. Keys the user writes beside
the source win over the entry's.
"""

from __future__ import annotations

import json
import os

from ..errors import ConfigError

SCHEME = "llamafactory:"
# The entry's keys ftflow reads, and those it refuses with the reason.
READ_KEYS = {"file_name", "hf_hub_url", "ms_hub_url", "formatting", "columns", "tags", "subset", "split"}
REFUSED_KEYS = {
    "ranking": "preference data (chosen/rejected) is for DPO, ORPO or reward models; ftflow trains SFT and pretraining",
    "script_url": "ftflow does not run dataset loading scripts",
    "cloud_file_name": "ftflow reads local files and the hub, not cloud storage",
    "folder": "a hub dataset's sub-folder is not supported; download it and name the files in file_name",
    "num_samples": "ftflow trains on every row of the file; cut the file, or mix it with a weight (stage `mix:`)",
}
REFUSED_COLUMNS = {
    "chosen": "preference data is for DPO, ORPO or reward models",
    "rejected": "preference data is for DPO, ORPO or reward models",
    "kto_tag": "KTO labels are for KTO training",
    "images": "ftflow trains text-only models",
    "videos": "ftflow trains text-only models",
    "audios": "ftflow trains text-only models",
}
FORMATTING = {"alpaca": "alpaca", "sharegpt": "sharegpt"}


def is_registry_source(source) -> bool:
    return isinstance(source, str) and source.startswith(SCHEME)


def registry_settings(path: str, raw: dict, workdir: str) -> dict:
    """The dataset's raw settings with the registry entry filled in under the user's own keys."""
    registry, entry_name, entry = _read_entry(f"{path}.source", raw["source"], workdir)
    where = f"{path}.source ({os.path.basename(registry)}#{entry_name})"
    for key, why in REFUSED_KEYS.items():
        if entry.get(key) not in (None, False):
            raise ConfigError(where, f"the entry sets {key!r}: {why}")
    unknown = sorted(set(entry) - READ_KEYS - set(REFUSED_KEYS))
    if unknown:
        raise ConfigError(where, f"the entry has keys ftflow does not read: {', '.join(unknown)}")
    columns = dict(entry.get("columns") or {})
    for key, why in REFUSED_COLUMNS.items():
        if key in columns:
            raise ConfigError(where, f"the entry maps a {key!r} column: {why}")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATTING:
        raise ConfigError(where, f"formatting {formatting!r} is not one ftflow reads", "alpaca or sharegpt")

    settings: dict = {"source": _source(where, registry, entry, workdir)}
    if entry.get("subset") is not None:
        settings["subset"] = entry["subset"]
    if settings["source"].startswith(("hub:", "modelscope:")):
        settings["hub_splits"] = {"train": entry.get("split", "train")}
    if formatting == "alpaca" and set(columns) <= {"prompt"} and columns:
        # LLaMA-Factory's pretraining layout: one text column, named as the prompt.
        settings.update(kind="text", text_column=columns["prompt"])
    else:
        settings.update(kind="chat", format=FORMATTING[formatting])
        if columns:
            settings["columns"] = columns
        if entry.get("tags"):
            if formatting != "sharegpt":
                raise ConfigError(where, "the entry sets tags, which only sharegpt formatting reads")
            settings["tags"] = dict(entry["tags"])
    given = {key: value for key, value in raw.items() if key != "source"}
    return {**settings, **given}


def _read_entry(path: str, source: str, workdir: str) -> tuple[str, str, dict]:
    spec = source[len(SCHEME) :]
    registry, _, entry_name = spec.partition("#")
    if not registry or not entry_name:
        raise ConfigError(path, f"{source!r} names no entry", "write llamafactory:<path to dataset_info.json>#<entry>")
    file = registry if os.path.isabs(registry) else os.path.join(workdir, registry)
    if not os.path.isfile(file):
        raise ConfigError(path, f"no registry file {registry!r}", f"paths are relative to {workdir}")
    try:
        with open(file, encoding="utf-8") as handle:
            entries = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(path, f"{registry} is not a JSON registry: {err}") from None
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise ConfigError(path, f"{registry} is not a LLaMA-Factory registry (an object of named entries)")
    if entry_name not in entries:
        close = sorted(entries, key=lambda name: (name.lower() != entry_name.lower(), name))[:5]
        raise ConfigError(path, f"{registry} has no entry {entry_name!r}", f"it has {', '.join(close)}, ...")
    return registry, entry_name, entries[entry_name]


def _source(where: str, registry: str, entry: dict, workdir: str) -> str:
    """The entry's data as an ftflow source: a hub id, or the file (or folder's files) it names."""
    if entry.get("hf_hub_url"):
        return f"hub:{entry['hf_hub_url']}"
    if entry.get("ms_hub_url"):
        return f"modelscope:{entry['ms_hub_url']}"
    name = entry.get("file_name")
    if not name:
        raise ConfigError(where, "the entry names no file_name, hf_hub_url or ms_hub_url")
    base = os.path.dirname(registry)
    target = os.path.join(base, name)
    absolute = target if os.path.isabs(target) else os.path.join(workdir, target)
    if os.path.isdir(absolute):
        return os.path.join(target, "*")  # LLaMA-Factory reads every file of a folder
    return target
