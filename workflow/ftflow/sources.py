"""Rows from every source a dataset can name, and the train/validation/test splits.

Sources (`datasets.<name>.source`):
  data/poems.jsonl, data/*.csv       local files: .jsonl .json .csv .parquet .txt, globs allowed
                                     (a .txt file gives one row per line, paragraph or file: `text_split`)
  {train: a.jsonl, test: b.jsonl}    local files per split
  hub:<id>                           `datasets.load_dataset` (subset, revision, hub_splits)
  modelscope:<id>                    `MsDataset.load` (pip install 'ftflow[modelscope]')
  generator:<name>                   ftflow's own generators (ftflow.generators)

Every row keeps where it came from ("poems.jsonl line 3") so that a message
about a bad row can name it. A row that cannot even be read (bytes that are not
UTF-8, a line that is not JSON) is kept as a `SourceRow` with a `problem`, so
that tokenization counts it among the dropped rows instead of losing it.

This module imports nothing heavy at the top: the planner (ftflow.config) uses `local_files`,
`peek_columns`, `peek_rows` and `check_split_settings` while Snakemake plans the DAG.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import random
from dataclasses import dataclass
from typing import Any

from .errors import FtflowError

SPLITS = ("train", "validation", "test")
LOCAL_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet", ".txt")
PEEK_ROWS = 20  # rows per file read at config time to check that columns exist
PEEK_JSON_BYTES = (
    4 * 2**20
)  # a .json array is parsed whole (0.16-0.19 s for 3.9 MiB here); larger ones are not peeked at
# Held-out rows cut from train when the source has no such split and `splits` does not say.
DEFAULT_HELD_OUT_FRACTION = 0.05
DEFAULT_HELD_OUT_MAX_ROWS = 1000
TEXT_SPLITS = ("line", "paragraph", "file")  # how a .txt file becomes documents (`text_split`)
JSON_SHAPES = (
    "an array of objects [{...}, ...], one object per line (JSON Lines), "
    'or an object whose values are such arrays ({"train": [...], "test": [...]})'
)


@dataclass(frozen=True)
class SourceRow:
    """One row of a source: its values, or why it could not be read."""

    where: str  # "poems.jsonl line 3", "hub:user/poems train row 17"
    values: dict | None  # None when the row could not be read
    problem: str | None = None  # drop reason for unreadable rows: not_utf8, invalid_json
    detail: str = ""


# --------------------------------------------------------------------------- local files


def local_files(pattern: str, workdir: str = ".") -> list[str]:
    """Files a path or glob names, sorted, so every run reads them in the same order."""
    full = pattern if os.path.isabs(pattern) else os.path.join(workdir, pattern)
    return sorted(f for f in glob.glob(full, recursive=True) if os.path.isfile(f))


def _extension(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in LOCAL_EXTENSIONS:
        raise FtflowError(f"unsupported file type {ext or '(none)'!r} ({path}); use {', '.join(LOCAL_EXTENSIONS)}")
    return ext


def _is_utf8(value: Any) -> bool:
    """False when a string decoded with surrogateescape carries bytes that were not UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_is_utf8(k) and _is_utf8(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_is_utf8(v) for v in value)
    return True


def _checked(where: str, values: Any) -> SourceRow:
    if not isinstance(values, dict):
        return SourceRow(where, None, "invalid_json", f"expected a JSON object, got {type(values).__name__}")
    if not _is_utf8(values):
        return SourceRow(where, None, "not_utf8", "bytes that are not valid UTF-8")
    return SourceRow(where, values)


def _read_jsonl(path: str) -> list[SourceRow]:
    name = os.path.basename(path)
    rows = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{name} line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                rows.append(SourceRow(where, None, "not_utf8", f"byte {err.start} of the line is not valid UTF-8"))
                continue
            if not line.strip():
                continue
            try:
                values = json.loads(line)
            except json.JSONDecodeError as err:
                rows.append(SourceRow(where, None, "invalid_json", err.msg))
                continue
            rows.append(_checked(where, values))
    return rows


def _read_json(path: str, split: str | None = None) -> list[SourceRow]:
    """A JSON array of objects, an object of such arrays (see `json_rows`), or JSON Lines saved as .json."""
    name = os.path.basename(path)
    with open(path, "rb") as handle:
        text = handle.read().decode("utf-8-sig", errors="surrogateescape")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        if text.lstrip().startswith("{"):
            return _read_jsonl(path)  # one object per line
        raise FtflowError(f"{path} is not valid JSON; ftflow reads {JSON_SHAPES}") from None
    key, items = json_rows(data, path, split)
    label = f"{name} {key}" if key else name
    return [_checked(f"{label} item {i}", values) for i, values in enumerate(items, start=1)]


def json_rows(data: Any, path: str, split: str | None) -> tuple[str | None, list]:
    """(the key the rows are under, or None; the rows) of a parsed .json file; FtflowError for other shapes.

    An object whose values are all arrays is read as named row lists: its one
    array, or, when it has several, the one named for the split a source mapping
    reads the file as (`source: {train: all.json, test: all.json}`). Any other
    object (one row, or pandas' column-oriented `to_json()`) is an error rather
    than a dataset of one row.
    """
    if isinstance(data, list):
        return None, data
    if not isinstance(data, dict):
        raise FtflowError(f"{path}: the top level is a JSON {type(data).__name__}; ftflow reads {JSON_SHAPES}")
    if not data or not all(isinstance(v, list) for v in data.values()):
        looks_like = (
            ' (it looks like pandas\' to_json(); write it with orient="records")'
            if data and all(isinstance(v, dict) for v in data.values())
            else ""
        )
        raise FtflowError(
            f"{path}: the top level is a JSON object, not a list of rows{looks_like}; ftflow reads {JSON_SHAPES}"
        )
    if len(data) == 1:
        return next(iter(data.items()))
    if split in data:
        return split, data[split]
    keys = ", ".join(repr(k) for k in data)
    if split is None:
        raise FtflowError(
            f"{path}: the top-level object holds several row lists ({keys}); say which split reads which, "
            f"e.g. source: {{train: {os.path.basename(path)}, test: {os.path.basename(path)}}} with keys named for the splits"
        )
    raise FtflowError(f"{path}: the top-level object has no row list named {split!r} (it has {keys})")


def _read_csv(path: str) -> list[SourceRow]:
    name = os.path.basename(path)
    with open(path, "rb") as handle:
        text = handle.read().decode("utf-8-sig", errors="surrogateescape")
    rows = []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for number, values in enumerate(reader, start=1):
        # A short row gets None for its missing fields, which the encoder reports
        # as a missing column; extra fields land under the None key: drop that key.
        values.pop(None, None)
        rows.append(_checked(f"{name} row {number}", values))
    return rows


def _read_parquet(path: str) -> list[SourceRow]:
    import pyarrow.parquet as pq

    name = os.path.basename(path)
    try:
        records = pq.read_table(path).to_pylist()
    except UnicodeDecodeError as err:
        raise FtflowError(f"{path}: a string column holds bytes that are not valid UTF-8 ({err.reason})") from err
    return [_checked(f"{name} row {i}", values) for i, values in enumerate(records, start=1)]


def _read_text(path: str, text_split: str) -> list[SourceRow]:
    """A .txt file as documents in the `text` column: one per non-empty line, per paragraph
    (runs of lines between blank lines) or the whole file, as `text_split` says."""
    name = os.path.basename(path)
    with open(path, "rb") as handle:
        text = handle.read().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    if text_split == "file":
        documents = [(name, text)] if text.strip() else []
    elif text_split == "line":
        documents = [(f"{name} line {n}", line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    elif text_split == "paragraph":
        documents, lines, first = [], [], 0
        for n, line in enumerate([*text.splitlines(), ""], start=1):  # a last blank line ends the last paragraph
            if line.strip():
                first = first or n
                lines.append(line)
            elif lines:
                where = f"{name} line {first}" if first == n - 1 else f"{name} lines {first}-{n - 1}"
                documents.append((where, "\n".join(lines)))
                lines, first = [], 0
    else:
        raise FtflowError(f"{path}: text_split is {text_split!r}; use one of {', '.join(TEXT_SPLITS)}")
    return [
        SourceRow(where, {"text": doc})
        if _is_utf8(doc)
        else SourceRow(where, None, "not_utf8", "bytes that are not valid UTF-8")
        for where, doc in documents
    ]


READERS = {".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}  # .json and .txt take options


def read_local(
    pattern: str, workdir: str = ".", split: str | None = None, text_split: str | None = None
) -> list[SourceRow]:
    """Rows of the files a path or glob names; `split` picks a .json file's row list by name,
    `text_split` how a .txt file becomes rows (the tokenize spec carries it when the source has .txt files)."""
    files = local_files(pattern, workdir)
    if not files:
        raise FtflowError(f"no file matches {pattern!r}")
    rows: list[SourceRow] = []
    for path in files:
        ext = _extension(path)
        if ext == ".txt":
            if text_split is None:
                raise FtflowError(f"{path}: the tokenize spec has no text_split for a .txt file; re-run snakemake")
            rows.extend(_read_text(path, text_split))
        elif ext == ".json":
            rows.extend(_read_json(path, split))
        else:
            rows.extend(READERS[ext](path))
    return rows


def peek_columns(path: str, limit: int = PEEK_ROWS, split: str | None = None) -> tuple[list[set[str]], str] | None:
    """Column names of the first rows of a local file, cheaply: ([columns of row 1, ...], row label).

    None when the file cannot be peeked at cheaply (a large .json array). Rows
    that cannot be read are skipped: tokenization reports them. A .json file of
    a shape ftflow does not read is a FtflowError (`json_rows`), as in tokenization.
    """
    ext = _extension(path)
    if ext == ".txt":
        return [{"text"}], "document"
    if ext == ".parquet":
        import pyarrow.parquet as pq

        return [set(pq.read_schema(path).names)], "row"
    if ext == ".csv":
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as handle:
            header = next(csv.reader(handle), [])
        return [set(header)], "row"
    peeked = peek_rows(path, limit, split)
    if peeked is None:
        return None
    return [set(values) for values in peeked[0]], peeked[1]


def peek_rows(path: str, limit: int = PEEK_ROWS, split: str | None = None) -> tuple[list[dict], str] | None:
    """The first rows of a local file, cheaply: ([values of row 1, ...], row label).

    None for .txt files and when the file cannot be peeked at cheaply (a large .json
    array). Rows that cannot be read are skipped: tokenization reports them. `split`
    picks the rows of a .json object holding one array per split (`json_rows`).
    """
    ext = _extension(path)
    if ext == ".txt":
        return None
    if ext == ".parquet":
        import pyarrow.parquet as pq

        first = next(pq.ParquetFile(path).iter_batches(batch_size=limit), None)
        return (first.to_pylist() if first is not None else []), "row"
    if ext == ".csv":
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as handle:
            rows = [dict(values) for values, _ in zip(csv.DictReader(handle), range(limit))]
        for values in rows:
            values.pop(None, None)
        return rows, "row"
    if ext == ".json" and os.path.getsize(path) > PEEK_JSON_BYTES:
        return None
    if ext == ".json":
        with open(path, "rb") as handle:
            data = _loads(handle.read())
        if data is None:  # JSON Lines saved as .json, or not JSON: tokenization says which
            return None
        rows = [_checked("", values) for values in json_rows(data, path, split)[1][:limit]]
    else:
        rows = []
        with open(path, "rb") as handle:
            for raw in handle:
                if raw.strip():
                    rows.append(raw)
                if len(rows) >= limit:
                    break
        rows = [_checked("", _loads(raw)) for raw in rows]
    return [r.values for r in rows[:limit] if r.values is not None], "line" if ext == ".jsonl" else "item"


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------- hubs and generators


def _load_hub(repo: str, dataset: dict) -> dict[str, list[SourceRow]]:
    import datasets

    name = dataset["dataset"]
    options = dataset.get("source_options") or {}
    wanted = options.get("hub_splits")
    try:
        if wanted:
            loaded = {
                split: datasets.load_dataset(
                    repo, options.get("subset"), split=hub_split, revision=options.get("revision")
                )
                for split, hub_split in wanted.items()
            }
        else:
            everything = datasets.load_dataset(repo, options.get("subset"), revision=options.get("revision"))
            loaded = {split: everything[split] for split in SPLITS if split in everything}
            if "train" not in loaded:
                raise FtflowError(
                    f"datasets.{name}.hub_splits: {repo!r} has no split named 'train' (it has {', '.join(everything)}); "
                    "say which to use, e.g. hub_splits: {train: <name>}"
                )
    except FtflowError:
        raise
    except Exception as err:  # network, auth, a missing repo, subset or split: say which dataset
        raise FtflowError(
            f"datasets.{name}.source: cannot load hub dataset {repo!r}"
            + (f" (subset {options['subset']!r})" if options.get("subset") else "")
            + f": {str(err).splitlines()[0] if str(err) else type(err).__name__}. "
            "Set HF_ENDPOINT for a mirror or HF_HOME to a cache that has it, or point source at local files."
        ) from err
    return {
        split: [SourceRow(f"hub:{repo} {split} row {i}", values) for i, values in enumerate(rows, start=1)]
        for split, rows in loaded.items()
    }


def _load_modelscope(repo: str, dataset: dict) -> dict[str, list[SourceRow]]:
    name = dataset["dataset"]
    try:
        from modelscope.msdatasets import MsDataset
    except ImportError as err:
        raise FtflowError(
            f"datasets.{name}.source: ModelScope sources need the optional extra: pip install 'ftflow[modelscope]'"
        ) from err
    options = dataset.get("source_options") or {}
    out = {}
    for split, ms_split in (options.get("hub_splits") or {"train": "train"}).items():
        kwargs = {"subset_name": options.get("subset"), "split": ms_split}
        if options.get("revision"):
            kwargs["version"] = options["revision"]
        try:
            loaded = MsDataset.load(repo, **kwargs)
        except Exception as err:
            raise FtflowError(
                f"datasets.{name}.source: cannot load ModelScope dataset {repo!r} split {ms_split!r}: {err}"
            ) from err
        out[split] = [
            SourceRow(f"modelscope:{repo} {split} row {i}", dict(values)) for i, values in enumerate(loaded, start=1)
        ]
    return out


def _generate(generator: str, dataset: dict) -> dict[str, list[SourceRow]]:
    from .generators import GENERATORS

    args = (dataset.get("source_options") or {}).get("args") or {}
    try:
        splits = GENERATORS[generator](**args)
    except (TypeError, ValueError) as err:
        raise FtflowError(f"datasets.{dataset['dataset']}.args: {err}") from err
    return {
        split: [SourceRow(f"generator:{generator} {split} row {i}", values) for i, values in enumerate(rows, start=1)]
        for split, rows in splits.items()
    }


def load_source(dataset: dict, workdir: str = ".") -> dict[str, list[SourceRow]]:
    """{split: rows} of a tokenization spec's source; splits the source lacks are absent."""
    source = dataset["source"]
    text_split = (dataset.get("source_options") or {}).get("text_split")
    if isinstance(source, dict):
        return {split: read_local(pattern, workdir, split, text_split) for split, pattern in source.items()}
    scheme, _, rest = source.partition(":")
    if scheme == "generator":
        return _generate(rest, dataset)
    if scheme == "hub":
        return _load_hub(rest, dataset)
    if scheme == "modelscope":
        return _load_modelscope(rest, dataset)
    return {"train": read_local(source, workdir, text_split=text_split)}


# --------------------------------------------------------------------------- splits


def check_split_settings(settings: Any) -> dict | None:
    """The `splits` setting normalized ({validation, test, seed}), or ValueError saying what is wrong."""
    if settings is None:
        return None
    if not isinstance(settings, dict):
        raise ValueError("expected a mapping {validation: n|fraction, test: n|fraction, seed: int}")
    unknown = set(settings) - {"validation", "test", "seed"}
    if unknown:
        raise ValueError(f"unknown key {sorted(unknown)[0]!r} (allowed: validation, test, seed)")
    seed = settings.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    out: dict[str, Any] = {"seed": seed}
    fractions = 0.0
    for split in ("validation", "test"):
        if split not in settings:
            continue
        value = settings[split]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{split} must be a row count or a fraction in [0, 1), got {value!r}")
        if isinstance(value, float) and value >= 1:
            if not value.is_integer():
                raise ValueError(f"{split}: {value} is neither a fraction below 1 nor a whole number of rows")
            value = int(value)
        if isinstance(value, float):
            fractions += value
        out[split] = value
    if fractions >= 1:
        raise ValueError(f"the fractions held out add up to {fractions:g}, leaving no training rows")
    return out


def _held_out_size(value: int | float | None, total: int) -> int:
    if value is None:  # the default: a small slice, never more than DEFAULT_HELD_OUT_MAX_ROWS
        if total < 3:
            return 0
        return max(1, min(DEFAULT_HELD_OUT_MAX_ROWS, round(DEFAULT_HELD_OUT_FRACTION * total)))
    if isinstance(value, float):
        return max(1, round(value * total)) if value > 0 and total >= 3 else 0
    return int(value)


def cut_splits(
    splits: dict[str, list], settings: dict | None, name: str, few_rows_hint: str = ""
) -> tuple[dict[str, list], dict]:
    """Cut the validation and test splits the source lacks from train, deterministically from a seed.

    Returns (splits, what was cut: {split: rows}). Rows keep their order inside
    each split; which rows are held out depends only on the seed and the row
    count, so the same source and settings always give the same splits. A split
    asked for that would get no row is an error, never a silent nothing;
    `few_rows_hint` ends the message about too few rows (e.g. how to get more).
    """
    settings = dict(settings or {})
    if "train" not in splits:
        raise FtflowError(
            f"datasets.{name}.source: the source has no train split (it has {', '.join(splits) or 'none'})"
        )
    for split in ("validation", "test"):
        if split in splits and split in settings:
            raise FtflowError(
                f"datasets.{name}.splits.{split}: the source has its own {split} split; remove splits.{split} to use it"
            )
    missing = [s for s in ("validation", "test") if s not in splits]
    if not missing:
        return splits, {}
    train = splits["train"]
    total = len(train)
    if not total:
        raise FtflowError(f"datasets.{name}.source: the train split has no rows (empty files, or only blank lines)")
    sizes = {split: _held_out_size(settings.get(split), total) for split in missing}
    rows = f"{total} training row{'' if total == 1 else 's'}"
    for split in missing:
        asked = settings.get(split)
        if asked and not sizes[split]:  # a fraction of fewer than 3 rows
            raise FtflowError(
                f"datasets.{name}.splits.{split}: {asked:g} of {rows} holds out no row (a fraction needs at least "
                f"3 rows); give more rows or ask for a row count{few_rows_hint}"
            )
    if sum(sizes.values()) >= total:
        raise FtflowError(
            f"datasets.{name}.splits: holding out {sizes} leaves no training rows out of {total}{few_rows_hint}"
        )
    order = list(range(total))
    random.Random(settings.get("seed", 0)).shuffle(order)
    out = dict(splits)
    start = 0
    for split in missing:
        if sizes[split]:
            out[split] = [train[i] for i in sorted(order[start : start + sizes[split]])]
        start += sizes[split]
    out["train"] = [train[i] for i in sorted(order[start:])]
    return out, {split: size for split, size in sizes.items() if size}
