"""tokenize: rows from any source -> token ids and labels, shared by all experiments.

Output folder `results/data/{data_id}/`:
  train/ validation/ test/   `datasets` folders with input_ids, labels, length
                             (+ prompt_ids and reference for generation on eval splits)
  stats.json                 rows in / kept / dropped by reason, tokens, label tokens,
                             truncated rows, length distribution, per split
Labels are -100 wherever the loss must not look: prompts (instruction,
`loss_on: completion`) and everything but assistant turns (chat).
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import random
import string
from collections import Counter
from typing import Any, Iterable

from .atomic import atomic_dir, read_json, write_json
from .errors import FtflowError

log = logging.getLogger("ftflow.data")

SPLITS = ("train", "validation", "test")
IGNORE = -100
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


class RowError(Exception):
    """A row that cannot be used; `reason` is one of the stats.json drop reasons."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------- loading rows


def _read_jsonl(path: str, counter: Counter) -> Iterable[dict]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                counter["not_utf8"] += 1
                yield {"__bad__": "not_utf8", "__where__": f"{os.path.basename(path)}:{number}"}
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                yield {"__bad__": "invalid_json", "__where__": f"{os.path.basename(path)}:{number}"}
                continue
            if not isinstance(row, dict):
                yield {"__bad__": "invalid_json", "__where__": f"{os.path.basename(path)}:{number}"}
                continue
            yield row


def _read_text(path: str, counter: Counter) -> Iterable[dict]:
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        counter["not_utf8"] += 1
        yield {"__bad__": "not_utf8", "__where__": os.path.basename(path)}
        return
    # one document per file; blank-line separated paragraphs stay together
    yield {"text": text}


def read_local(pattern: str, workdir: str = ".") -> list[dict]:
    full = pattern if os.path.isabs(pattern) else os.path.join(workdir, pattern)
    files = sorted(f for f in glob.glob(full, recursive=True) if os.path.isfile(f))
    if not files:
        raise FtflowError(f"no file matches {pattern!r}")
    rows: list[dict] = []
    counter: Counter = Counter()
    for path in files:
        ext = os.path.splitext(path)[1].lower()
        if ext == ".jsonl":
            rows.extend(_read_jsonl(path, counter))
        elif ext == ".txt":
            rows.extend(_read_text(path, counter))
        elif ext in (".json", ".csv", ".parquet"):
            import datasets

            loaded = datasets.load_dataset(LOCAL_FORMATS[ext], data_files=path, split="train")
            rows.extend(loaded.to_list())
        else:
            raise FtflowError(f"unsupported file type {ext!r} ({path}); use .jsonl, .json, .csv, .parquet or .txt")
    return rows


def load_source(dataset: dict, workdir: str = ".") -> dict[str, list[dict]]:
    """Return {split: rows}; splits absent from the source are missing from the dict."""
    source = dataset["source"]
    if isinstance(source, dict):
        return {split: read_local(pattern, workdir) for split, pattern in source.items()}
    scheme, _, rest = source.partition(":")
    if scheme == "generator":
        from .generators import GENERATORS

        return GENERATORS[rest](**(dataset.get("args") or {}))
    if scheme == "hub":
        return _load_hub(rest, dataset)
    if scheme == "modelscope":
        return _load_modelscope(rest, dataset)
    return {"train": read_local(source, workdir)}


def _load_hub(repo: str, dataset: dict) -> dict[str, list[dict]]:
    import datasets

    try:
        loaded = datasets.load_dataset(repo, dataset.get("subset"), revision=dataset.get("revision"))
    except Exception as err:
        raise FtflowError(
            f"datasets.{dataset['name']}.source: cannot load hub dataset {repo!r}: {err}. "
            "Set HF_ENDPOINT for a mirror or HF_HOME to a cache that has it, or point source at local files."
        ) from err
    return _pick_splits(loaded, dataset)


def _load_modelscope(repo: str, dataset: dict) -> dict[str, list[dict]]:
    try:
        from modelscope.msdatasets import MsDataset
    except ImportError as err:
        raise FtflowError(
            f"datasets.{dataset['name']}.source: ModelScope sources need the extra: pip install 'ftflow[modelscope]'"
        ) from err
    out = {}
    mapping = dataset.get("hub_splits") or {"train": "train"}
    for split, name in mapping.items():
        loaded = MsDataset.load(repo, subset_name=dataset.get("subset"), split=name)
        out[split] = [dict(row) for row in loaded]
    return out


def _pick_splits(loaded, dataset: dict) -> dict[str, list[dict]]:
    mapping = dataset.get("hub_splits") or {s: s for s in SPLITS if s in loaded}
    if "train" not in mapping and "train" in loaded:
        mapping["train"] = "train"
    out = {}
    for split, name in mapping.items():
        if name not in loaded:
            raise FtflowError(f"datasets.{dataset['name']}.hub_splits.{split}: the source has no split {name!r} (has {list(loaded)})")
        out[split] = loaded[name].to_list()
    return out


def cut_splits(splits: dict[str, list[dict]], settings: dict | None, name: str) -> dict[str, list[dict]]:
    """Cut missing validation/test splits from train, deterministically from a seed."""
    settings = dict(settings or {})
    seed = settings.pop("seed", 0)
    train = splits.get("train")
    if train is None:
        raise FtflowError(f"datasets.{name}: the source has no train split")
    missing = [s for s in ("validation", "test") if s not in splits]
    if not missing:
        return splits
    rng = random.Random(seed)
    order = list(range(len(train)))
    rng.shuffle(order)
    total = len(train)
    sizes = {}
    for split in missing:
        value = settings.get(split, 0.05 if total >= 40 else 0.2)
        size = int(round(value * total)) if isinstance(value, float) and value < 1 else int(value)
        sizes[split] = max(1, size) if total > 2 else 0
    if sum(sizes.values()) >= total:
        raise FtflowError(f"datasets.{name}.splits: {sizes} leave no training rows out of {total}")
    out = dict(splits)
    start = 0
    for split in missing:
        out[split] = [train[i] for i in order[start : start + sizes[split]]]
        start += sizes[split]
    out["train"] = [train[i] for i in sorted(order[start:])]
    return out


# --------------------------------------------------------------------------- encoding


def split_template(template: str) -> tuple[str, str]:
    """Split an instruction template at its last placeholder: (prompt, completion).

    '请创作一首古诗，主题关于{title}：\n{content}' -> ('请创作一首古诗，主题关于{title}：\n', '{content}')
    """
    parts = list(string.Formatter().parse(template))
    placeholders = [i for i, (_, field, _, _) in enumerate(parts) if field]
    if not placeholders:
        raise FtflowError(f"template {template!r} has no {{column}} placeholder")
    last = placeholders[-1]
    prompt = "".join(
        literal + ("{" + field + "}" if field else "") for literal, field, _, _ in parts[:last]
    ) + parts[last][0]
    return prompt, template[len(prompt) :] if template.startswith(prompt) else "{" + parts[last][1] + "}"


def template_columns(template: str) -> list[str]:
    return [fld for _, fld, _, _ in string.Formatter().parse(template) if fld]


class Encoder:
    """Turns one row into token ids, labels and (for eval) the prompt and reference."""

    def __init__(self, tokenizer, dataset: dict, max_length: int):
        self.tok = tokenizer
        self.ds = dataset
        self.kind = dataset["kind"]
        self.max_length = max_length
        self.truncate = dataset.get("truncation", "drop") == "truncate"
        default_loss = {"text": "all", "instruction": "completion", "chat": "assistant"}[self.kind]
        self.loss_on = dataset.get("loss_on") or default_loss
        if self.kind == "instruction":
            if dataset.get("prompt") is not None and dataset.get("completion") is not None:
                self.prompt_t, self.completion_t = dataset["prompt"], dataset["completion"]
            else:
                self.prompt_t, self.completion_t = split_template(dataset["template"])
            self.columns = template_columns(self.prompt_t) + template_columns(self.completion_t)
        if self.kind == "chat":
            template = dataset.get("chat_template")
            if template:
                if os.path.exists(template):
                    with open(template, encoding="utf-8") as handle:
                        template = handle.read()
                self.tok.chat_template = template
            if not getattr(self.tok, "chat_template", None):
                raise FtflowError(
                    f"datasets.{dataset['name']}: the tokenizer has no chat template; "
                    "set datasets.<name>.chat_template (or models.<name>.chat_template) to a Jinja template"
                )
            self.turn_end = self._probe_turn_end()

    # -- chat
    def _render(self, messages, add_generation_prompt=False) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _probe_turn_end(self) -> str:
        probe = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "PONG-7"}]
        text = self._render(probe)
        tail = text[text.rfind("PONG-7") + len("PONG-7") :]
        return tail

    def _assistant_spans(self, messages) -> tuple[str, list[tuple[int, int]]]:
        text = self._render(messages)
        spans = []
        search = 0
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            prefix = self._render(messages[:i], add_generation_prompt=True) if i else ""
            upto = self._render(messages[: i + 1])
            if i and text.startswith(prefix) and text.startswith(upto) and len(upto) > len(prefix):
                spans.append((len(prefix), len(upto)))
                search = len(upto)
                continue
            # Templates that re-render earlier turns (e.g. dropping reasoning) break the
            # prefix property; find the content itself and the template's turn end.
            content = message.get("content") or ""
            start = text.find(content, search)
            if start < 0:
                raise RowError("template_error", "assistant content not found in the rendered chat")
            end = start + len(content)
            if self.turn_end and text.startswith(self.turn_end, end):
                end += len(self.turn_end)
            spans.append((start, end))
            search = end
        return text, spans

    def encode_chat(self, row: dict) -> dict:
        messages = row.get(self.ds.get("messages_column", "messages"))
        if messages is None:
            raise RowError("missing_column", self.ds.get("messages_column", "messages"))
        if not isinstance(messages, list) or not messages:
            raise RowError("empty")
        for message in messages:
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise RowError("template_error", "each message needs 'role' and 'content'")
            if not str(message.get("content") or "").strip() and message.get("role") == "assistant":
                raise RowError("empty", "empty assistant message")
        if not any(m.get("role") == "assistant" for m in messages):
            raise RowError("empty", "no assistant message")
        try:
            text, spans = self._assistant_spans(messages)
        except RowError:
            raise
        except Exception as err:  # jinja errors from the template itself
            raise RowError("template_error", str(err).splitlines()[0]) from err
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        if self.loss_on == "all":
            labels = list(ids)
        else:
            labels = [IGNORE] * len(ids)
            for j, (start, end) in enumerate(enc["offset_mapping"]):
                if end > start and any(s <= start and end <= e for s, e in spans):
                    labels[j] = ids[j]
        out = {"input_ids": ids, "labels": labels}
        if messages[-1].get("role") == "assistant":
            prompt = self._render(messages[:-1], add_generation_prompt=True)
            out["prompt_ids"] = self.tok(prompt, add_special_tokens=False)["input_ids"]
            out["reference"] = messages[-1]["content"]
        return out

    # -- instruction
    def encode_instruction(self, row: dict) -> dict:
        for column in self.columns:
            if row.get(column) is None:
                raise RowError("missing_column", column)
        values = {c: str(row[c]) for c in self.columns}
        if any(not values[c].strip() for c in template_columns(self.completion_t)):
            raise RowError("empty")
        try:
            prompt = self.prompt_t.format(**values)
            completion = self.completion_t.format(**values)
        except (KeyError, IndexError, ValueError) as err:
            raise RowError("template_error", str(err)) from err
        prompt_ids = self.tok(prompt, add_special_tokens=True)["input_ids"]
        completion_ids = self.tok(completion, add_special_tokens=False)["input_ids"]
        if self.tok.eos_token_id is not None:
            completion_ids = completion_ids + [self.tok.eos_token_id]
        ids = prompt_ids + completion_ids
        if self.loss_on == "all":
            labels = list(ids)
        else:
            labels = [IGNORE] * len(prompt_ids) + list(completion_ids)
        return {"input_ids": ids, "labels": labels, "prompt_ids": prompt_ids, "reference": completion}

    def encode(self, row: dict) -> dict:
        if "__bad__" in row:
            raise RowError(row["__bad__"], row.get("__where__", ""))
        out = self.encode_chat(row) if self.kind == "chat" else self.encode_instruction(row)
        if len(out["input_ids"]) > self.max_length:
            if not self.truncate:
                raise RowError("over_length", f"{len(out['input_ids'])} > {self.max_length} tokens")
            out["input_ids"] = out["input_ids"][: self.max_length]
            out["labels"] = out["labels"][: self.max_length]
            out["truncated"] = True
        if not any(label != IGNORE for label in out["labels"][1:]):
            raise RowError("no_label_tokens", "no token carries a label")
        return out


def encode_text_blocks(tokenizer, rows: list[dict], column: str, max_length: int, counter: Counter, bad: dict) -> list[dict]:
    """Concatenate documents (EOS between them) and cut into blocks of max_length tokens."""
    stream: list[int] = []
    for number, row in enumerate(rows):
        if "__bad__" in row:
            counter[row["__bad__"]] += 1
            bad.setdefault(row["__bad__"], row.get("__where__", number))
            continue
        text = row.get(column)
        if text is None:
            counter["missing_column"] += 1
            bad.setdefault("missing_column", number)
            continue
        if not str(text).strip():
            counter["empty"] += 1
            bad.setdefault("empty", number)
            continue
        ids = tokenizer(str(text), add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
            ids = [tokenizer.bos_token_id] + ids
        stream.extend(ids)
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
    blocks = []
    for start in range(0, len(stream), max_length):
        block = stream[start : start + max_length]
        if len(block) >= 2:
            blocks.append({"input_ids": block, "labels": list(block)})
    return blocks


# --------------------------------------------------------------------------- the step


def length_stats(lengths: list[int]) -> dict:
    if not lengths:
        return {"count": 0}
    ordered = sorted(lengths)

    def pct(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(math.ceil(q * len(ordered))) - 1)]

    edges = [0, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 1 << 30]
    histogram = {}
    for lo, hi in zip(edges, edges[1:]):
        count = sum(1 for n in ordered if lo < n <= hi)
        if count:
            histogram[f"{lo + 1}-{hi if hi < 1 << 30 else 'inf'}"] = count
    return {
        "count": len(ordered),
        "min": ordered[0],
        "mean": round(sum(ordered) / len(ordered), 2),
        "p50": pct(0.5),
        "p90": pct(0.9),
        "p99": pct(0.99),
        "max": ordered[-1],
        "histogram": histogram,
    }


def tokenize(spec_path: str, out: str, workdir: str = ".", num_proc: int = 1) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer

    spec = read_json(spec_path)
    dataset = spec["dataset"]
    name = dataset["name"]
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    max_length = spec["max_length"]

    raw = load_source(dataset, workdir)
    raw = cut_splits(raw, dataset.get("splits"), name)
    caps = spec.get("row_caps") or {}

    stats: dict[str, Any] = {"data_id": spec["data_id"], "dataset": name, "kind": dataset["kind"], "max_length": max_length, "splits": {}}
    encoder = None if dataset["kind"] == "text" else Encoder(tokenizer, dataset, max_length)
    with atomic_dir(out) as tmp:
        for split in SPLITS:
            rows = raw.get(split)
            if rows is None:
                continue
            if split in caps:
                rows = rows[: caps[split]]
            dropped: Counter = Counter()
            first_bad: dict[str, Any] = {}
            truncated = 0
            if encoder is None:
                records = encode_text_blocks(tokenizer, rows, dataset.get("text_column", "text"), max_length, dropped, first_bad)
            else:
                records = []
                for number, row in enumerate(rows):
                    try:
                        record = encoder.encode(row)
                    except RowError as err:
                        dropped[err.reason] += 1
                        first_bad.setdefault(err.reason, {"row": number, "detail": err.detail})
                        continue
                    truncated += int(record.pop("truncated", False))
                    records.append(record)
            if rows and not records:
                reason, count = dropped.most_common(1)[0] if dropped else ("unknown", 0)
                where = first_bad.get(reason, {})
                column_hint = ""
                if reason == "missing_column":
                    column_hint = f", column {where.get('detail')!r}" if isinstance(where, dict) else ""
                raise FtflowError(
                    f"datasets.{name}: every row of split {split!r} is unusable "
                    f"({count} x {reason}{column_hint}; first at row {where.get('row') if isinstance(where, dict) else where})"
                )
            lengths = [len(r["input_ids"]) for r in records]
            for record in records:
                record["length"] = len(record["input_ids"])
            ds = Dataset.from_list(records) if records else Dataset.from_dict({"input_ids": [], "labels": [], "length": []})
            ds.save_to_disk(os.path.join(tmp, split))
            stats["splits"][split] = {
                "rows_in": len(rows),
                "kept": len(records),
                "dropped": dict(dropped),
                "first_dropped": first_bad,
                "truncated": truncated,
                "tokens": sum(lengths),
                "label_tokens": sum(sum(1 for t in r["labels"] if t != IGNORE) for r in records),
                "lengths": length_stats(lengths),
            }
        write_json(os.path.join(tmp, "stats.json"), stats)
    return stats
