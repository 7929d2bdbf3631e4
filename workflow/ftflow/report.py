"""report: one table that answers "which config won, and why".

Reads every experiment's config.json, train_metrics.json, eval/metrics.json
and TensorBoard events; writes summary.csv, report.md, report.html and
plots/*.png. One row per experiment and per untuned baseline:

  best, rank      `*` on the best tuned row by the primary metric (ties broken
                  by eval loss; a baseline is ranked but never marked best)
  settings        the stages and methods, then only the settings that differ
                  between experiments, with short names (lr, batch, r, ...)
  cost            trainable parameters, steps, tokens, tokens/s, time, memory
  quality         train loss, eval loss, perplexity, task metrics, delta
                  against the baseline of the same model and eval data
  status          ok, diverged, failed (with the error's first line and the
                  log path) or not run

The Snakefile's `onerror` handler writes the same report to report/partial/
when jobs fail, so failed experiments show beside the ones that finished.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import re
import shutil

from .atomic import atomic_dir, read_json, write_text
from .hashing import content_hash
from .errors import FtflowError

LOWER_IS_BETTER = {"eval_loss", "perplexity", "invalid_json", "invalid_json_rate"}
PARTIAL_DIR = "partial"
ERROR_LINE = re.compile(r"^(?:ftflow: error: |[A-Za-z_.]*(?:Error|Exception|Interrupt): )(.+)$")
STATUS_ORDER = ("ok", "diverged", "failed", "not run")

# Short column names, in column order, for the settings sweeps vary most; other keys show their last part.
SHORT_NAMES = {
    "training.learning_rate": "lr",
    "training.per_device_train_batch_size": "batch",
    "training.gradient_accumulation_steps": "accum",
    "training.num_train_epochs": "epochs",
    "training.warmup_steps": "warmup",
    "training.lr_scheduler_type": "scheduler",
    "lora.r": "r",
    "lora.lora_alpha": "alpha",
    "lora.lora_dropout": "dropout",
    "lora.target_modules": "targets",
    "max_length": "max_len",
    "training.gradient_checkpointing": "grad_ckpt",
}

# (key, label, format, description) of the fixed columns: cost after the settings, then losses.
COST_COLUMNS = (
    ("trainable_params", "trainable", "count", "trainable parameters (last stage)"),
    ("steps", "steps", "int", "optimizer steps, all stages"),
    ("train_tokens", "train tokens", "count", "tokens trained on, all stages (packed: no padding)"),
    ("tokens_per_s", "tokens/s", "rate", "training throughput: train tokens / train time"),
    ("train_seconds", "train time", "seconds", "training wall time, all stages"),
    ("peak_mem_mb", "peak mem", "mb", "peak memory: allocated GPU memory on a GPU, process RSS on a CPU"),
)
LOSS_COLUMNS = (
    ("final_train_loss", "train loss", "loss", "training loss at the last logged step"),
    ("eval_loss", "eval loss", "loss", "mean cross-entropy per label token on the loss split"),
    ("perplexity", "ppl", "loss", "exp(eval loss)"),
)
HIDDEN_METRICS = {"invalid_json_rate"}  # invalid_json (the count) is shown instead


# --------------------------------------------------------------------------- collecting


def _read_fresh(path: str, config_hash: str):
    """The JSON at `path`, or None when missing, unreadable or written for another config.

    A failed job leaves the outputs of an earlier config's run in place
    downstream of it; their provenance hash tells them apart.
    """
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    recorded = (data.get("provenance") or {}).get("config_hash")
    return data if recorded in (None, config_hash) else None


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, sub, out)
    else:
        out[prefix] = value


def stage_settings(stage: dict) -> dict:
    """The settings of one stage that matter for its method, flattened to dotted keys."""
    out: dict = {key: stage[key] for key in ("method", "dataset", "max_length", "packing", "init_from")}
    _flatten("training", stage["training"], out)
    for section, methods in (("lora", ("lora", "qlora")), ("quantization", ("qlora",)), ("adalora", ("adalora",))):
        if stage["method"] in methods:
            _flatten(section, stage[section], out)
    return out


def experiment_settings(config: dict) -> dict:
    """Every setting of an experiment; a multi-stage experiment's keys start with `stage/`."""
    out: dict = {"model": config["model"]}
    stages = config["stages"]
    for stage in stages:
        prefix = "" if len(stages) == 1 else f"{stage['name']}/"
        for key, value in stage_settings(stage).items():
            out[prefix + key] = value
    for key in ("dataset", "split", "max_new_tokens", "do_sample", "temperature", "top_p", "max_examples"):
        out[f"eval.{key}"] = config["eval"][key]
    return out


def first_error(log_path: str) -> str | None:
    """The line of a failed job's log that says what went wrong."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as handle:
            lines = [line.strip() for line in handle.read().splitlines() if line.strip()]
    except OSError:
        return None
    for line in lines:
        if line.startswith("ftflow: error:"):
            return line[len("ftflow: error:") :].strip()[:300]
    for line in reversed(lines):  # the last line of a traceback names the exception
        if ERROR_LINE.match(line):
            return line[:300]
    return lines[-1][:300] if lines else None


def job_chain(results: str, logs: str, config: dict) -> list[tuple[str, str, str]]:
    """(step, output, log) of every job an experiment's evaluation needs, in run order.

    The paths mirror the rules in workflow/rules/*.smk.
    """
    model = config["model"] + (".smoke" if config.get("smoke") else "")
    chain = [("prepare_model", f"{results}/models/{model}", f"{logs}/models/{model}.log")]
    data_ids = list(dict.fromkeys([s["data_id"] for s in config["stages"]] + [config["eval"]["data_id"]]))
    chain += [("tokenize", f"{results}/data/{d}", f"{logs}/data/{d}.log") for d in data_ids]
    name, stages = config["name"], config["stages"]
    for i, stage in enumerate(stages):
        where = f"{results}/{name}/{stage['name']}"
        step = "" if len(stages) == 1 else f"{stage['name']}/"  # a single stage needs no name in the note
        chain.append((f"{step}train", f"{where}/train_metrics.json", f"{logs}/{name}/{stage['name']}/train.log"))
        merged_needed = i == len(stages) - 1 or stages[i + 1]["init_from"] == "merged"
        if merged_needed:
            chain.append((f"{step}merge", f"{where}/merged", f"{logs}/{name}/{stage['name']}/merge.log"))
    chain.append(("evaluate", f"{results}/{name}/eval/metrics.json", f"{logs}/{name}/eval.log"))
    return chain


def find_failure(results: str, logs: str, config: dict, config_mtime: float) -> dict:
    """The first job of the chain without its output: failed if it left a log for this config, else not run."""
    for step, output, log in job_chain(results, logs, config):
        if os.path.exists(output):
            continue
        if os.path.exists(log) and os.path.getmtime(log) >= config_mtime:
            return {"status": "failed", "where": step, "log": log, "error": first_error(log)}
        return {"status": "not run", "where": step, "log": None, "error": None}
    return {"status": "failed", "where": "evaluate", "log": None, "error": "eval/metrics.json is unreadable"}


def collect(results: str, logs: str, experiments: list[str]) -> list[dict]:
    rows = []
    for name in experiments:
        config_path = os.path.join(results, name, "config.json")
        try:
            config = read_json(config_path)
        except (OSError, ValueError):
            continue
        digest = content_hash(config)
        stages = [_read_fresh(os.path.join(results, name, s["name"], "train_metrics.json"), digest) for s in config["stages"]]
        evaluation = _read_fresh(os.path.join(results, name, "eval", "metrics.json"), digest)
        row = {"experiment": name, "config": config, "stages": stages, "eval": evaluation, "status": "ok", "problem": None}
        stopped = next((m for m in stages if m and m["status"] != "ok"), None)
        if stopped is not None:
            row["status"] = stopped["status"]
            where = "train" if len(stages) == 1 else f"{stopped['stage']}/train"
            row["problem"] = {"where": where, "error": stopped.get("reason"), "log": None}
        elif evaluation is None:
            failure = find_failure(results, logs, config, os.path.getmtime(config_path))
            row["status"] = failure.pop("status")
            row["problem"] = failure
        elif evaluation["status"] != "ok":
            row["status"] = evaluation["status"]
            row["problem"] = {"where": "evaluate", "error": evaluation.get("reason"), "log": None}
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- table


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def short_names(keys: list[str], taken: set[str]) -> dict[str, str]:
    """{full key: column label}; a label two keys would share falls back to the full keys."""
    labels = {}
    for key in keys:
        stage, _, dotted = key.rpartition("/")
        label = SHORT_NAMES.get(dotted, dotted.split(".")[-1])
        labels[key] = f"{stage}/{label}" if stage else label
    counts: dict[str, int] = {}
    for label in labels.values():
        counts[label] = counts.get(label, 0) + 1
    return {key: (label if counts[label] == 1 and label not in taken else key) for key, label in labels.items()}


def stages_text(config: dict) -> str:
    stages = config["stages"]
    if not stages:
        return "untuned"
    if len(stages) == 1:
        return stages[0]["method"]
    return " > ".join(f"{s['name']}:{s['method']}" for s in stages)


def _row_line(row: dict, settings: dict) -> dict:
    ev = row["eval"] or {}
    done = [m for m in row["stages"] if m]
    tokens = sum(m.get("tokens") or 0 for m in done)
    seconds = sum(m.get("wall_seconds") or 0 for m in done)
    peaks = [m.get("peak_gpu_mb") or m.get("peak_rss_mb") for m in done]
    line = {
        "experiment": row["experiment"],
        "stages": stages_text(row["config"]),
        "trainable_params": done[-1].get("trainable_parameters") if done else None,
        "steps": sum(m.get("steps") or 0 for m in done) if done else None,
        "train_tokens": tokens if done else None,
        "tokens_per_s": tokens / seconds if done and seconds else None,
        "train_seconds": seconds if done else None,
        "peak_mem_mb": max((p for p in peaks if p), default=None),
        "final_train_loss": done[-1].get("final_loss") if done else None,
        "eval_loss": ev.get("eval_loss"),
        "perplexity": ev.get("perplexity"),
        "status": row["status"],
        "_baseline": bool(row["config"]["baseline"]),
        "_settings": settings,
        "_group": (row["config"]["eval"]["dataset"], row["config"]["eval"]["primary_metric"] or "eval_loss"),
        "_base_key": (row["config"]["model"], row["config"]["eval"]["data_id"]),
    }
    for key, value in (ev.get("metrics") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # per_field is a dict: metrics.json has it
            line[key] = value
    problem = row["problem"] or {}
    parts = [p for p in (problem.get("where"), problem.get("error")) if p]
    line["note"] = f"waits for {problem['where']}" if row["status"] == "not run" else ": ".join(parts)
    line["log"] = problem.get("log") or ""
    return line


def rank_group(group: dict, lines: list[dict]) -> list[dict]:
    """Mark the best tuned row(s), rank the tuned rows and return the group's rows in table order."""
    primary, lower = group["primary"], group["lower_is_better"]
    sign = 1.0 if lower else -1.0

    def sort_key(line):
        loss = _number(line.get("eval_loss"))
        return (sign * _number(line.get(primary)), loss if loss is not None else math.inf)

    scored = [line for line in lines if line["status"] == "ok" and _number(line.get(primary)) is not None]
    scored.sort(key=lambda line: (*sort_key(line), line["_baseline"]))  # a tie puts the tuned row first
    tuned = [line for line in scored if not line["_baseline"]]
    group["tie_on_primary"] = len(tuned) > 1 and len({_number(line[primary]) for line in tuned}) == 1
    previous, rank = None, 0
    for position, line in enumerate(tuned, start=1):
        key = sort_key(line)
        rank = rank if key == previous else position  # competition ranking: 1, 1, 3
        previous = key
        line["rank"] = rank
    winners = [line for line in tuned if line["rank"] == 1]
    group["all_tied"] = len(tuned) > 1 and len(winners) == len(tuned)
    if not group["all_tied"]:
        for line in winners:
            line["best"] = "*"
    group["best"] = [line["experiment"] for line in winners] if not group["all_tied"] else []
    rest = [line for line in lines if line not in scored]
    rest.sort(key=lambda line: STATUS_ORDER.index(line["status"]) if line["status"] in STATUS_ORDER else len(STATUS_ORDER))
    return scored + rest


def build_table(rows: list[dict]) -> dict:
    """The table: columns (key, label, format, description), lines in display order, groups, settings."""
    tuned = [r for r in rows if not r["config"]["baseline"]]
    settings = {r["experiment"]: experiment_settings(r["config"]) for r in rows}
    keys = sorted({k for r in tuned for k in settings[r["experiment"]]})
    varied = [k for k in keys if len({json.dumps(settings[r["experiment"]].get(k), sort_keys=True) for r in tuned}) > 1]
    varied = [k for k in varied if k.rpartition("/")[2] != "method"]  # the stages column shows methods
    preferred = list(SHORT_NAMES)
    varied.sort(key=lambda k: (k.rpartition("/")[0], preferred.index(k.rpartition("/")[2]) if k.rpartition("/")[2] in preferred else len(preferred), k))
    shared = {k: settings[tuned[0]["experiment"]].get(k) for k in keys if k not in varied} if tuned else {}

    lines = []
    for row in rows:
        line = _row_line(row, settings[row["experiment"]])
        line.update({k: settings[row["experiment"]].get(k) for k in varied})
        line.setdefault("best", "")
        line.setdefault("rank", None)
        lines.append(line)

    metric_names: list[str] = []
    for row in rows:
        for key, value in ((row["eval"] or {}).get("metrics") or {}).items():
            if isinstance(value, (int, float)) and key not in metric_names and key not in HIDDEN_METRICS:
                metric_names.append(key)

    group_keys = list(dict.fromkeys(line["_group"] for line in lines))
    groups, ordered = [], []
    for key in group_keys:
        dataset, primary = key
        group = {"key": key, "dataset": dataset, "primary": primary, "lower_is_better": primary in LOWER_IS_BETTER}
        members = [line for line in lines if line["_group"] == key]
        ordered.extend(rank_group(group, members))
        groups.append(group)
    baselines = {line["_base_key"]: line for line in lines if line["_baseline"]}
    for line in lines:
        primary = line["_group"][1]
        base = baselines.get(line["_base_key"])
        value, reference = _number(line.get(primary)), _number((base or {}).get(primary))
        delta = value - reference if not line["_baseline"] and value is not None and reference is not None else None
        line[f"delta_{primary}"] = delta
    for group in groups:
        base = next((line for line in lines if line["_group"] == group["key"] and line["_baseline"]), None)
        group["baseline_value"] = _number((base or {}).get(group["primary"]))

    fixed = COST_COLUMNS + LOSS_COLUMNS
    taken = {"best", "rank", "experiment", "stages", "status", "note", "log"} | {c[0] for c in fixed} | set(metric_names)
    labels = short_names(varied, taken)
    primaries = list(dict.fromkeys(group["primary"] for group in groups))
    losses = {c[0]: c for c in LOSS_COLUMNS}

    def score_column(name):
        return losses.get(name) or (name, name, "metric", f"task metric {name} on the generated answers")

    # The answer first (who, whether it finished, its score, its margin), then why
    # (stages and the varied settings), then what it cost, then everything else.
    columns = [
        ("best", "best", "text", "* marks the best tuned row by the primary metric"),
        ("rank", "rank", "int", "rank of the tuned rows by the primary metric, ties broken by eval loss"),
        ("experiment", "experiment", "text", "experiment name"),
        ("status", "status", "text", "ok, diverged, failed or not run"),
        *[score_column(p) for p in primaries],
        *[(f"delta_{p}", f"Δ {p}", "delta", f"{p} minus the untuned baseline's") for p in primaries],
        *([losses["eval_loss"]] if "eval_loss" not in primaries else []),
        ("stages", "stages", "text", "method, or stage:method per stage"),
        *[(key, labels[key], "setting", key) for key in varied],
        *COST_COLUMNS,
        *[c for c in LOSS_COLUMNS if c[0] not in primaries and c[0] != "eval_loss"],
        *[score_column(name) for name in metric_names if name not in primaries],
        ("note", "note", "text", "where and why a run did not finish ok"),
        ("log", "log", "text", "log of the failed job"),
    ]
    if not any(line["log"] for line in lines):
        columns = [c for c in columns if c[0] != "log"]
    settings_list = [{"key": key, "short": labels[key]} for key in varied]
    return {"columns": columns, "lines": ordered, "groups": groups, "settings": settings_list, "shared": shared}


# --------------------------------------------------------------------------- formatting


def compact_float(value: float) -> str:
    """5e-05 -> 5e-5, 0.0015 -> 1.5e-3, 0.05 -> 0.05, 1e+20 -> 1e20."""
    text = f"{value:.3g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        return f"{mantissa}e{int(exponent)}"
    if 0 < abs(value) < 0.01:
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{float(mantissa):g}e{int(exponent)}"
    return text


def format_value(kind: str, value) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if kind == "count" and isinstance(value, (int, float)):
        for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
            if abs(value) >= size:
                return f"{value / size:.3g}{suffix}"
        return str(int(value))
    if kind == "int" and isinstance(value, (int, float)):
        return str(int(value))
    if kind == "rate" and isinstance(value, (int, float)):
        return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
    if kind == "seconds" and isinstance(value, (int, float)):
        if value < 60:
            return f"{value:.1f}s"
        minutes, seconds = divmod(int(round(value)), 60)
        return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"
    if kind == "mb" and isinstance(value, (int, float)):
        return f"{value / 1024:.2f} GiB" if value >= 1024 else f"{value:.0f} MiB"
    if kind == "loss" and isinstance(value, (int, float)):
        return f"{value:.4g}"
    if kind == "metric" and isinstance(value, (int, float)):
        if isinstance(value, int):
            return str(value)
        return f"{value:.3f}" if abs(value) <= 1 else f"{value:.2f}"
    if kind == "delta" and isinstance(value, (int, float)):
        return f"{value:+.3f}" if abs(value) <= 1 else f"{value:+.3g}"
    if kind == "setting":
        if isinstance(value, float):
            return compact_float(value)
        if isinstance(value, (list, dict)):
            return json.dumps(value, ensure_ascii=False)
    return str(value)


def headline(group: dict, table: dict) -> str:
    """One sentence per group: who won, by how much, and with which settings."""
    primary, lines = group["primary"], [line for line in table["lines"] if line["_group"] == group["key"]]
    tuned = [line for line in lines if not line["_baseline"]]
    finished = [line for line in tuned if line["status"] == "ok"]
    base = next((line for line in lines if line["_baseline"]), None)
    text = f"{primary} on {group['dataset']} ({'lower' if group['lower_is_better'] else 'higher'} is better): "
    if not finished:
        return text + "no tuned run finished."
    if group["all_tied"]:
        return text + f"all {len(finished)} finished runs tie, on eval loss too; no best row."
    best = [line for line in lines if line["best"]]
    kind = "loss" if group["lower_is_better"] else "metric"
    names = ", ".join(line["experiment"] for line in best)
    if group["tie_on_primary"]:
        # the primary metric does not tell the runs apart: say so, and show what did
        text += f"every finished run scores {format_value(kind, best[0].get(primary))}, so eval loss decides: best {names}"
        text += f" at eval loss {format_value('loss', best[0].get('eval_loss'))}"
        if base is not None and _number(base.get("eval_loss")) is not None:
            text += f" (untuned baseline {format_value('loss', base['eval_loss'])})"
    else:
        text += f"best {names} at {format_value(kind, best[0].get(primary))}"
        if group["baseline_value"] is not None:
            delta = best[0].get(f"delta_{primary}")
            text += f" ({format_value('delta', delta)} against the untuned baseline's {format_value(kind, group['baseline_value'])})"
        if len(best) > 1:
            text += ", a tie"
    if base is not None and _number(base.get(primary)) is not None and not group["tie_on_primary"]:
        if lines.index(base) < lines.index(best[0]):
            text += "; no tuned run beats the untuned baseline"
    # settings the best run has (an AdaLoRA-only key is no setting of a LoRA run)
    chosen = [
        f"{s['short']} {format_value('setting', best[0]['_settings'][s['key']])}"
        for s in table["settings"]
        if best[0]["_settings"].get(s["key"]) is not None
    ]
    if chosen:
        text += ". Its settings: " + ", ".join(chosen)
    not_ok = [line for line in tuned if line["status"] != "ok"]
    if not_ok:
        text += ". Not finished: " + ", ".join(f"{line['experiment']} ({line['status']})" for line in not_ok)
    return text + "."


# --------------------------------------------------------------------------- writers


def to_csv(table: dict) -> str:
    """Full setting keys and unrounded numbers, for scripts and spreadsheets."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = table["columns"]
    writer.writerow([key for key, *_ in columns])
    for line in table["lines"]:
        cells = []
        for key, *_ in columns:
            value = line.get(key)
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, (list, dict)):
                value = json.dumps(value, ensure_ascii=False)
            cells.append("" if value is None else value)
        writer.writerow(cells)
    return buffer.getvalue()


def _problems(table: dict) -> list[dict]:
    return [line for line in table["lines"] if line["status"] != "ok"]


def _abbreviations(table: dict) -> str:
    pairs = [f"{s['short']} = {s['key']}" for s in table["settings"] if s["short"] != s["key"]]
    return "; ".join(pairs)


def _shared_text(table: dict) -> list[str]:
    return [f"{key}: {'none' if value is None else format_value('setting', value)}" for key, value in table["shared"].items()]


def _clip(text: str, width: int = 90) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def to_markdown(table: dict, plots: list[str], title: str) -> str:
    columns = [c for c in table["columns"] if c[0] != "log"]
    out = [f"# {title}", ""]
    out += [f"- {headline(group, table)}" for group in table["groups"]]
    out.append("")
    out.append("| " + " | ".join(label for _, label, _, _ in columns) + " |")
    out.append("|" + "|".join("---" if kind == "text" else "--:" for _, _, kind, _ in columns) + "|")
    for line in table["lines"]:
        cells = []
        for key, _, kind, _ in columns:
            text = format_value(kind, line.get(key))
            text = _clip(text) if key == "note" else text
            cells.append(f"**{text}**" if line["best"] and key == "experiment" else text.replace("|", "\\|"))
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    if _abbreviations(table):
        out += [f"Columns: {_abbreviations(table)}.", ""]
    problems = _problems(table)
    if problems:
        out += ["## Runs that did not finish", ""]
        for line in problems:
            where = f" (log: `{line['log']}`)" if line["log"] else ""
            out.append(f"- **{line['experiment']}**: {line['status']}; {line['note'] or 'no error recorded'}{where}")
        out.append("")
    if table["shared"]:
        out += ["## Settings shared by every tuned experiment", "", ", ".join(f"`{t}`" for t in _shared_text(table)), ""]
    if plots:
        out += ["## Plots", ""] + [f"![{p}](plots/{p})" for p in plots] + [""]
    return "\n".join(out)


SORT_SCRIPT = """
document.querySelectorAll('table.runs th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0];
    var asc = th.dataset.dir !== 'asc';
    document.querySelectorAll('table.runs th').forEach(function (h) { delete h.dataset.dir; });
    th.dataset.dir = asc ? 'asc' : 'desc';
    var rows = Array.from(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
      if (x === '' && y !== '') return 1;   // empty cells last, either direction
      if (y === '' && x !== '') return -1;
      var nx = parseFloat(x), ny = parseFloat(y);
      var cmp = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
      return asc ? cmp : -cmp;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em 2em; color: #212529; }
h1 { font-size: 1.5em; margin-bottom: .3em; }
ul.headlines { padding-left: 1.2em; line-height: 1.45; }
.wrap { overflow-x: auto; max-width: 100%; }
table.runs { border-collapse: collapse; font-size: 12.5px; }
table.runs th, table.runs td { border: 1px solid #dee2e6; padding: 3px 7px; text-align: right; white-space: nowrap; }
table.runs th { background: #f1f3f5; cursor: pointer; position: sticky; top: 0; }
table.runs th[data-dir=asc]::after { content: " \\25B2"; font-size: 9px; }
table.runs th[data-dir=desc]::after { content: " \\25BC"; font-size: 9px; }
table.runs th.setting { background: #e7f5ff; }
table.runs td.text { text-align: left; }
table.runs td.note { white-space: normal; min-width: 16em; max-width: 28em; }
tr.best td { background: #d3f9d8; font-weight: 600; }
tr.baseline td { background: #f8f9fa; color: #495057; font-style: italic; }
tr.diverged td, tr.failed td { background: #fff5f5; color: #c92a2a; }
tr.notrun td { color: #868e96; }
td.better { color: #2b8a3e; }
td.worse { color: #c92a2a; }
.plots img { max-width: 48.5%; margin: .4%; border: 1px solid #dee2e6; vertical-align: top; }
.plots img.wide { max-width: 99%; }
details { margin: 1em 0; font-size: 13px; }
code { font-size: 12px; }
"""


def _delta_class(key: str, value, table: dict) -> str:
    number = _number(value)
    if not key.startswith("delta_") or number is None or number == 0:
        return ""
    lower = key[len("delta_") :] in LOWER_IS_BETTER
    return "better" if (number < 0) == lower else "worse"


def to_html(table: dict, plots: dict[str, bytes], title: str) -> str:
    esc = html.escape
    columns = table["columns"]
    head = "".join(
        f'<th title="{esc(description)}"{" class=setting" if kind == "setting" else ""}>{esc(label)}</th>'
        for _, label, kind, description in columns
    )
    body = []
    for line in table["lines"]:
        classes = ["best" if line["best"] else "", "baseline" if line["_baseline"] else "", line["status"].replace(" ", "")]
        cells = []
        for key, _, kind, _ in columns:
            value = line.get(key)
            text = format_value(kind, value)
            number = _number(value)
            sort_value = repr(number) if number is not None else ("" if value in (None, "") else text)
            css = " ".join(c for c in ("text" if number is None else "", "note" if key == "note" else "", _delta_class(key, value, table)) if c)
            title_attr = f' title="{esc(str(value))}"' if kind in ("count", "setting") and value is not None else ""
            class_attr = f' class="{css}"' if css else ""
            cells.append(f'<td{class_attr} data-v="{esc(sort_value)}"{title_attr}>{esc(text)}</td>')
        body.append(f'<tr class="{" ".join(c for c in classes if c and c != "ok")}">' + "".join(cells) + "</tr>")
    headlines = "".join(f"<li>{esc(headline(group, table))}</li>" for group in table["groups"])
    abbreviations = f"<p><small>Columns: {esc(_abbreviations(table))}. Hover a header for its meaning.</small></p>" if _abbreviations(table) else ""
    shared = ""
    if table["shared"]:
        shared = "<details><summary>Settings shared by every tuned experiment</summary><p>" + ", ".join(
            f"<code>{esc(t)}</code>" for t in _shared_text(table)
        ) + "</p></details>"
    # Plots are embedded, so the page stands alone (mailed, or inside `snakemake --report`).
    images = "\n".join(
        f'<img src="data:image/png;base64,{base64.b64encode(data).decode()}" alt="{esc(name)}" title="plots/{esc(name)}"'
        f'{"" if name.endswith("loss.png") else " class=wide"}>'
        for name, data in plots.items()
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{esc(title)}</h1>
<ul class="headlines">{headlines}</ul>
<p><small>Green row: best tuned run; grey italic: untuned baseline; red: did not finish ok. Click a column header to sort.</small></p>
<div class="wrap"><table class="runs"><thead><tr>{head}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table></div>
{abbreviations}
{shared}
<h2>Plots</h2>
<div class="plots">
{images}
</div>
<script>{SORT_SCRIPT}</script>
</body></html>
"""


def write_report(results: str, logs: str, experiments: list[str], out_dir: str, title: str = "ftflow report") -> dict:
    from .plots import make_plots

    rows = collect(results, logs, experiments)
    if not rows:
        raise FtflowError(f"no experiment of {', '.join(experiments) or '(none)'} has a config.json under {results}")
    table = build_table(rows)
    os.makedirs(out_dir, exist_ok=True)
    with atomic_dir(os.path.join(out_dir, "plots")) as tmp:
        plots = make_plots(rows, table["lines"], table["groups"], table["settings"], results, tmp)
    write_text(os.path.join(out_dir, "report.md"), to_markdown(table, plots, title))
    images = {}
    for name in plots:
        with open(os.path.join(out_dir, "plots", name), "rb") as handle:
            images[name] = handle.read()
    write_text(os.path.join(out_dir, "report.html"), to_html(table, images, title))
    # summary.csv last: it marks the step complete
    write_text(os.path.join(out_dir, "summary.csv"), to_csv(table))
    # a full report supersedes the partial one an earlier failed run left beside it
    shutil.rmtree(os.path.join(out_dir, PARTIAL_DIR), ignore_errors=True)
    groups = table["groups"]
    return {"rows": len(table["lines"]), "best": [name for g in groups for name in g["best"]], "primary": [g["primary"] for g in groups], "plots": plots}
