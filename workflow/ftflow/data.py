"""tokenize: rows from any source -> token ids and labels, shared by every experiment.

Output folder `results/data/{data_id}/`:
  train/ validation/ test/   `datasets` folders: input_ids, labels, length, source_row
                             (+ prompt_ids and reference, for generation at eval time)
  stats.json                 per split: rows in / kept / dropped by reason (with the
                             first dropped row of each reason), truncated rows, tokens,
                             label tokens, the length distribution; `warnings`: each split
                             that lost more than 5% of its rows, with the reasons and the fix

How each kind's rows become token ids and labels is encoder.py's Encoder (chat rows
are first read in their format by formats.py); this module runs it over the splits
with `datasets.map`, saves them and counts. Rows that cannot be used are dropped
and counted by reason, never repaired; a split in which no row can be used is an
error naming the dataset, the reason (column) and an example row.

The template helpers and the setting names the planner hashes live in
encoding.py (standard library only); this module is the job's side.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from .atomic import atomic_dir, read_json, write_json
from .encoder import Encoder
from .encoding import IGNORE
from .errors import FtflowError, RowError
from .sources import SPLITS, SourceRow, cut_splits, load_source
from .split_stats import drop_counts, drop_warning, empty_split_message, length_stats, unusable_split_error

log = logging.getLogger("ftflow.data")

DROP_REASONS = {
    "empty": "the text to learn is empty (or a template column is null)",
    "missing_column": "a column the kind or template needs is absent from the row",
    "not_utf8": "the row's bytes are not valid UTF-8",
    "invalid_json": "the line is not a JSON object",
    "invalid_messages": "the row does not have its chat format's shape (openai: a list of {role, content}; "
    "sharegpt: a list of {from, value} with known roles; alpaca: text columns and [user, assistant] "
    "history pairs), or a tool call, tools column or loss_weight cannot be read",
    "template_error": "the template could not be applied to the row",
    "over_length": "longer than max_length tokens (truncation: drop)",
    "no_label_tokens": "no token is left to learn (e.g. truncation cut the whole answer)",
}
# Worker processes for datasets.map pay only where Python work per row dominates:
# chat rows (four or more Jinja renders each, ~1.4 ms a row on one core). A fast
# tokenizer already spreads a batch over all cores in Rust, so instruction and
# text rows run in one process. A worker costs ~1 s to start and receive the
# tokenizer; measured on 2 cores, 16,000 chat rows took 25.0 s in one process
# and 20.0 s in two, 4,000 rows 5.1 s and 6.6 s: one process per 5,000 rows.
ROWS_PER_PROCESS = 5000
MAP_BATCH_ROWS = 256


# --------------------------------------------------------------------------- datasets.map


def _encode_batch(batch: dict, encoder: Encoder) -> dict:
    rows = [
        SourceRow(where, json.loads(raw) if raw else None, problem or None, detail)
        for where, raw, problem, detail in zip(batch["where"], batch["row"], batch["problem"], batch["detail"])
    ]
    out: dict[str, list] = {
        k: [] for k in ("where", "drop", "detail", "input_ids", "labels", "prompt_ids", "reference", "truncated")
    }
    for row, result in zip(rows, encoder.encode_rows(rows)):
        out["where"].append(row.where)
        if isinstance(result, RowError):
            out["drop"].append(result.reason)
            out["detail"].append(result.detail)
            result = {}
        else:
            out["drop"].append("")
            out["detail"].append("")
        out["input_ids"].append(result.get("input_ids", []))
        out["labels"].append(result.get("labels", []))
        out["prompt_ids"].append(result.get("prompt_ids", []))
        out["reference"].append(result.get("reference"))
        out["truncated"].append(bool(result.get("truncated", False)))
    return out


def choose_num_proc(rows: int, threads: int, python_bound: bool) -> int:
    """Worker processes for `datasets.map`: one per ROWS_PER_PROCESS rows, at most `threads`,
    and only when the per-row work is Python (chat rendering, a slow tokenizer)."""
    if not python_bound:
        return 1
    return max(1, min(threads, rows // ROWS_PER_PROCESS))


def encode_split(rows: list[SourceRow], encoder: Encoder, threads: int):
    """`datasets.map` (batched, `num_proc` from the job's threads) over one split's rows."""
    from datasets import Dataset, Features, Sequence, Value

    table = Dataset.from_dict(
        {
            "where": [r.where for r in rows],
            # rows travel as JSON text: sources disagree on column types, a JSON string never does
            "row": [
                json.dumps(r.values, ensure_ascii=False, default=str) if r.values is not None else "" for r in rows
            ],
            "problem": [r.problem or "" for r in rows],
            "detail": [r.detail for r in rows],
        }
    )
    ids = Sequence(Value("int32"))
    features = Features(
        {
            "where": Value("string"),
            "drop": Value("string"),
            "detail": Value("string"),
            "input_ids": ids,
            "labels": ids,
            "prompt_ids": ids,
            "reference": Value("string"),
            "truncated": Value("bool"),
        }
    )
    num_proc = choose_num_proc(len(rows), threads, python_bound=encoder.kind == "chat" or not encoder.tok.is_fast)
    if num_proc > 1:
        # forked workers must not start the tokenizer's own thread pool on top of each other
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    encoded = table.map(
        _encode_batch,
        batched=True,
        batch_size=MAP_BATCH_ROWS,
        fn_kwargs={"encoder": encoder},
        remove_columns=table.column_names,
        features=features,
        num_proc=num_proc if num_proc > 1 else None,
        desc=None,
    )
    return encoded, num_proc


def text_blocks(encoded, max_length: int) -> list[list[int]]:
    """Kept documents, joined in order, cut into blocks of max_length tokens (the last may be shorter)."""
    blocks: list[list[int]] = []
    carry: list[int] = []
    for drop, ids in zip(encoded["drop"], encoded["input_ids"]):
        if drop:
            continue
        carry.extend(ids)
        whole = len(carry) - len(carry) % max_length  # cut all full blocks at once: one copy per document
        blocks.extend(carry[start : start + max_length] for start in range(0, whole, max_length))
        carry = carry[whole:]
    if len(carry) >= 2:  # a 1-token block predicts nothing
        blocks.append(carry)
    return blocks


# --------------------------------------------------------------------------- reading the splits back


def load_split(data_dir: str, split: str, columns: tuple[str, ...] | None = None):
    """One tokenized split as written by `tokenize` (only `columns` of it, those it has), or None if absent.

    The one reader of this folder's splits: the train job takes the model
    inputs of train/ and validation/, the eval job all of validation/ or test/.
    """
    from datasets import load_from_disk

    path = os.path.join(data_dir, split)
    if not os.path.isdir(path):
        return None
    dataset = load_from_disk(path)
    if columns is None:
        return dataset
    return dataset.select_columns([c for c in columns if c in dataset.column_names])


# --------------------------------------------------------------------------- the step


def tokenize(spec_path: str, out: str, workdir: str = ".", num_proc: int = 1) -> dict:
    """Tokenize one spec (results/data/{data_id}.json) into `out`; return stats.json's content.

    `num_proc` is the most worker processes `datasets.map` may use (the job's threads).
    """
    import datasets

    from .models import load_tokenizer  # models (torch) imports nothing of data back

    datasets.disable_progress_bars()  # the job log gets one line per split instead
    started = time.perf_counter()
    spec = read_json(spec_path)
    tokenizer = load_tokenizer(spec["model_dir"])
    encoder = Encoder(tokenizer, spec["kind"], spec["encoding"], spec["max_length"], spec["dataset"])
    splits, held_out = read_splits(spec, workdir)
    stats = stats_header(spec, tokenizer, held_out)
    with atomic_dir(out) as tmp:
        for split, rows in splits.items():
            if not rows:
                raise FtflowError(empty_split_message(spec, split))
            stats["splits"][split] = split_stats = save_split(
                spec["dataset"], split, rows, encoder, os.path.join(tmp, split), num_proc
            )
            log.info(
                "%s %s: %d rows in, %d kept, dropped %s",
                spec["dataset"],
                split,
                len(rows),
                split_stats["kept"],
                split_stats["dropped"] or "none",
            )
            warning = drop_warning(spec["dataset"], split, split_stats, spec["max_length"])
            if warning:
                log.warning("%s", warning["message"])
                stats["warnings"].append(warning)
        stats["seconds"] = round(time.perf_counter() - started, 2)
        write_json(os.path.join(tmp, "stats.json"), stats)
    return stats


def read_splits(spec: dict, workdir: str) -> tuple[dict[str, list[SourceRow]], Any]:
    """({split: rows}, in SPLITS order, after held-out cuts and smoke-mode row caps; what was held out)."""
    raw = load_source(spec, workdir)
    text_split = (spec.get("source_options") or {}).get("text_split")
    hint = (
        f" (with text_split: {text_split} a .txt file is one row; text_split: line or paragraph gives one per line or paragraph)"
        if text_split == "file"
        else ""
    )
    raw, held_out = cut_splits(raw, spec.get("splits"), spec["dataset"], few_rows_hint=hint)
    for split in ("validation", "test"):
        # the default holds out nothing from fewer than 3 rows; evaluation stops on it too
        if split not in raw and split not in (spec.get("splits") or {}):
            rows = len(raw["train"])
            log.warning(
                "%s: no %s split, from %d training row%s%s", spec["dataset"], split, rows, "s"[rows == 1 :], hint
            )
    caps = spec.get("row_caps") or {}
    splits = {}
    for split in SPLITS:
        rows = raw.get(split)
        if rows is not None:
            splits[split] = rows[: caps[split]] if split in caps else rows
    return splits, held_out


def stats_header(spec: dict, tokenizer, held_out) -> dict[str, Any]:
    """stats.json without its per-split part: what was tokenized, with which tokenizer."""
    return {
        "data_id": spec["data_id"],
        "dataset": spec["dataset"],
        "kind": spec["kind"],
        "source": spec["source"],
        "max_length": spec["max_length"],
        "tokenizer": {"name": getattr(tokenizer, "name_or_path", ""), "vocab_size": len(tokenizer)},
        "held_out_from_train": held_out,
        "row_caps": spec.get("row_caps") or None,  # smoke mode reads only the first rows of each split
        "drop_reasons": DROP_REASONS,
        "splits": {},
        "warnings": [],  # drop_warning of each split that lost more than 5% of its rows
    }


def save_split(
    name: str, split: str, rows: list[SourceRow], encoder: Encoder, folder: str, num_proc: int
) -> dict[str, Any]:
    """Encode one split, save its kept rows (text: its blocks) to `folder`; return its stats."""
    from datasets import Dataset

    encoded, used_proc = encode_split(rows, encoder, num_proc)
    dropped, first, longest = drop_counts(encoded)
    if rows and len(dropped) and sum(dropped.values()) == len(rows):
        raise unusable_split_error(name, split, dropped, first)
    stats: dict[str, Any] = {"rows_in": len(rows), "kept": len(rows) - sum(dropped.values())}
    if encoder.kind == "text":
        blocks = text_blocks(encoded, encoder.max_length)
        if rows and not blocks:
            raise FtflowError(f"datasets.{name}: the {split} split has fewer than 2 tokens of text")
        saved = Dataset.from_dict({"input_ids": blocks, "labels": blocks, "length": [len(b) for b in blocks]})
        stats["blocks"] = len(blocks)
        truncated = 0
    else:
        kept = [i for i, drop in enumerate(encoded["drop"]) if not drop]
        saved = encoded.select(kept).remove_columns(["drop", "detail"])
        truncated = sum(saved["truncated"])
        saved = saved.remove_columns(["truncated"]).rename_column("where", "source_row")
        saved = saved.add_column("length", [len(x) for x in saved["input_ids"]])
    saved.save_to_disk(folder)
    lengths = saved["length"]
    stats.update(
        {
            "dropped": dict(dropped),
            "first_dropped": first,
            "longest_dropped": longest or None,  # tokens of the longest over_length row
            "truncated": truncated,
            "tokens": int(sum(lengths)),
            "label_tokens": int(sum(sum(1 for t in labels[1:] if t != IGNORE) for labels in saved["labels"])),
            "lengths": length_stats(lengths),
            "num_proc": used_proc,
        }
    )
    return stats
