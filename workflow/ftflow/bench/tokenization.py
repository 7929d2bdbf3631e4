"""Tokenization: rows/s per data kind through ftflow's tokenize step, and a cache hit.

The three kinds tokenize the same generated rows (the embedded column-mapping
task), written as local JSONL files so every kind reads its rows the same way:
  chat         {"messages": [system, user, assistant]}, labels on the assistant turn
  instruction  {"question", "answer"}, template "{question}\\n{answer}"
  text         {"text"}: the three turns joined, cut into max_length blocks
Each is a dataset of one generated config, resolved by `build_plan` into the
same tokenize spec the workflow writes, and run through `data.tokenize` with
one process (`num_proc` 1, what the embedded default's 400 rows get).

Cache hit: re-running `snakemake` for the bench data folder, which is already
present, must plan no tokenize job; its wall time is the cost of a hit.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from ..errors import FtflowError
from .inputs import run_snakemake, snakemake_command

KINDS = ("chat", "instruction", "text")
NOTHING_TO_DO = "Nothing to be done"


def _write_rows(folder: str, rows: int) -> dict[str, str]:
    """One JSONL file per kind, all from the same generated rows; {kind: path}."""
    from ..generators.column_mapping import generate

    chats = generate(seed=1, train=rows, validation=0, test=0)["train"]
    shapes = {
        "chat": lambda m: {"messages": m},
        "instruction": lambda m: {"question": f"{m[0]['content']}\n{m[1]['content']}", "answer": m[2]["content"]},
        "text": lambda m: {"text": "\n".join(turn["content"] for turn in m)},
    }
    paths = {}
    for kind, shape in shapes.items():
        paths[kind] = os.path.join(folder, f"{kind}.jsonl")
        with open(paths[kind], "w", encoding="utf-8") as handle:
            for row in chats:
                handle.write(json.dumps(shape(row["messages"]), ensure_ascii=False) + "\n")
    return paths


def _config(model: str, model_spec: dict, paths: dict[str, str], max_length: int) -> dict:
    datasets = {
        "bench-chat": {"source": paths["chat"], "kind": "chat", "max_length": max_length},
        "bench-instruction": {
            "source": paths["instruction"],
            "kind": "instruction",
            "template": "{question}\n{answer}",
            "max_length": max_length,
        },
        "bench-text": {"source": paths["text"], "kind": "text", "max_length": max_length},
    }
    return {
        "models": {model: model_spec},
        "datasets": datasets,
        "defaults": {"model": model},
        "experiments": {name: {"dataset": name} for name in datasets},
    }


def bench_kinds(inputs, settings, log=print) -> dict:
    """rows/s and tokens/s per kind through `data.tokenize` (one process)."""
    import yaml

    from ..config import build_plan
    from ..data import tokenize

    with open(inputs.configfile, encoding="utf-8") as handle:
        model_spec = (yaml.safe_load(handle).get("models") or {})[inputs.model]
    out = {}
    with tempfile.TemporaryDirectory(prefix="ftflow-bench-tok-") as tmp:
        paths = _write_rows(tmp, settings.tokenize_rows)
        results = os.path.join(tmp, "results")
        plan = build_plan(_config(inputs.model, model_spec, paths, inputs.max_length), workdir=tmp, results=results)
        plan.write_specs()
        # the tokenizer is read from the prepared model folder; the bench's is already there
        os.makedirs(os.path.join(results, "models"), exist_ok=True)
        os.symlink(inputs.model_dir, os.path.join(results, "models", plan.model_dir_name(inputs.model)))
        # imports and the first tokenizer load are paid once here, not by whichever kind runs first
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(inputs.model_dir)
        for data_id, data in sorted(plan.data.items(), key=lambda item: KINDS.index(item[1].dataset.kind)):
            kind = data.dataset.kind
            started = time.perf_counter()
            stats = tokenize(
                os.path.join(results, "data", data_id + ".json"),
                os.path.join(results, "data", data_id),
                workdir=tmp,
                num_proc=1,
            )
            seconds = time.perf_counter() - started
            splits = stats["splits"].values()
            rows = sum(s["rows_in"] for s in splits)
            tokens = sum(s["tokens"] for s in splits)
            out[kind] = {
                "rows": rows,
                "kept": sum(s["kept"] for s in splits),
                "tokens": tokens,
                "seconds": round(seconds, 3),
                "rows_per_second": round(rows / seconds, 1),
                "tokens_per_second": round(tokens / seconds, 1),
            }
            log(f"tokenize {kind}: {rows} rows in {seconds:.2f} s ({rows / seconds:.0f} rows/s)")
    return out


def bench_cache_hit(inputs) -> dict:
    """Wall time of `snakemake` (a run and a dry run) for the bench data folder that is already there."""
    from ..atomic import read_json

    target = os.path.relpath(inputs.data_dir, inputs.work)
    out = {}
    for name, args in (("run_seconds", ("--cores", "2")), ("dry_run_seconds", ("-n", "--cores", "2"))):
        seconds, output = run_snakemake(
            snakemake_command(inputs.work, inputs.configfile, inputs.smoke, *args, target), "the cache-hit run"
        )
        if NOTHING_TO_DO not in output or "rule tokenize" in output:
            raise FtflowError(
                f"bench: re-running snakemake for {target} planned jobs; a tokenization cache hit should plan none:\n{output[-3000:]}"
            )
        out[name] = round(seconds, 3)
    stats = read_json(os.path.join(inputs.data_dir, "stats.json"))
    out["tokenize_job_seconds"] = stats.get("seconds")  # what the miss cost when the folder was made
    out["tokenize_jobs_planned"] = 0
    return out
