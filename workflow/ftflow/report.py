"""report: one table that answers "which config won, and why".

Reads every experiment's config.json, train_metrics.json, eval/metrics.json and
TensorBoard events; writes summary.csv, report.md, report.html and plots/*.png.
Columns: the experiment, its stages and methods, only the settings that vary
across experiments, cost (parameters, tokens, tokens/s, time, memory), losses,
task metrics, status and the delta to the matching baseline. The best row per
primary metric is marked. Experiments whose jobs failed appear as `failed`,
with the first line of the error and the log path.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
import re

from .atomic import atomic_dir, read_json, write_text

LOWER_IS_BETTER = {"eval_loss", "perplexity"}
ERROR_LINE = re.compile(r"^(?:ftflow: error: |[A-Za-z_.]*(?:Error|Exception): )(.+)$")


# --------------------------------------------------------------------------- collecting


def _read(path: str):
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, sub, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, list) else value


def stage_settings(stage: dict) -> dict:
    """The settings of one stage that matter for its method, flattened to dotted keys."""
    out: dict = {}
    for key in ("method", "dataset", "max_length", "packing", "init_from"):
        out[key] = stage[key]
    _flatten("training", stage["training"], out)
    if stage["method"] in ("lora", "qlora"):
        _flatten("lora", stage["lora"], out)
    if stage["method"] == "qlora":
        _flatten("quantization", stage["quantization"], out)
    if stage["method"] == "adalora":
        _flatten("adalora", stage["adalora"], out)
    return out


def experiment_settings(config: dict) -> dict:
    stages = config["stages"]
    out: dict = {"model": config["model"]}
    for stage in stages:
        prefix = "" if len(stages) == 1 else f"{stage['name']}."
        for key, value in stage_settings(stage).items():
            out[prefix + key] = value
    return out


def first_error(log_path: str) -> str | None:
    """The first line that reads like the error of a failed job's log."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    for line in lines:
        match = ERROR_LINE.match(line.strip())
        if match and line.strip().startswith("ftflow: error:"):
            return match.group(1)[:300]
    for line in reversed(lines):
        match = ERROR_LINE.match(line.strip())
        if match:
            return line.strip()[:300]
    return None


def collect(results: str, logs: str, experiments: list[str]) -> list[dict]:
    rows = []
    for name in experiments:
        config = _read(os.path.join(results, name, "config.json"))
        if config is None:
            continue
        row = {"experiment": name, "config": config, "stages": [], "status": "ok"}
        error = None
        for stage in config["stages"]:
            tm = _read(os.path.join(results, name, stage["name"], "train_metrics.json"))
            if tm is None:
                row["status"] = "failed"
                log_path = os.path.join(logs, name, stage["name"], "train.log")
                error = error or {"where": f"{stage['name']}/train", "log": log_path, "error": first_error(log_path)}
            elif tm["status"] != "ok" and row["status"] == "ok":
                row["status"] = tm["status"]
                error = error or {"where": f"{stage['name']}/train", "error": tm.get("reason")}
            row["stages"].append(tm)
        ev = _read(os.path.join(results, name, "eval", "metrics.json"))
        if ev is None and row["status"] == "ok":
            row["status"] = "failed"
            log_path = os.path.join(logs, name, "eval.log")
            if not config["stages"] or all(row["stages"]):
                # the train jobs finished: the merge or the evaluation failed
                for candidate in [os.path.join(logs, name, s["name"], "merge.log") for s in config["stages"]] + [log_path]:
                    message = first_error(candidate)
                    if message:
                        error = {"where": os.path.basename(candidate), "log": candidate, "error": message}
                        break
                else:
                    error = {"where": "eval", "log": log_path, "error": None}
        row["eval"] = ev
        row["error"] = error
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- table


def _fmt(value, digits: int = 4):
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value)


def build_table(rows: list[dict]) -> tuple[list[str], list[dict], dict]:
    """Return (columns, table rows, info) with only the varying settings as columns."""
    tuned = [r for r in rows if not r["config"]["baseline"]]
    settings = {r["experiment"]: experiment_settings(r["config"]) for r in tuned}
    keys = sorted({k for s in settings.values() for k in s})
    varied = [k for k in keys if len({json.dumps(s.get(k), default=str) for s in settings.values()}) > 1]
    if "method" not in varied and any("method" in s for s in settings.values()):
        varied.insert(0, "method")
    metric_names: list[str] = []
    for r in rows:
        for key, value in ((r["eval"] or {}).get("metrics") or {}).items():
            if isinstance(value, (int, float)) and key not in metric_names:
                metric_names.append(key)
    primary = next((r["config"]["eval"]["primary_metric"] for r in rows if r["config"]["eval"].get("primary_metric")), "eval_loss")

    table = []
    for r in rows:
        ev = r["eval"] or {}
        stages = [s for s in r["stages"] if s]
        line = {
            "experiment": r["experiment"],
            "stages": " > ".join(f"{s['name']}:{s['method']}" for s in r["config"]["stages"]) or "(untuned)",
        }
        for key in varied:
            line[key] = settings.get(r["experiment"], {}).get(key)
        last = stages[-1] if stages else {}
        line.update(
            {
                "trainable_params": last.get("trainable_parameters"),
                "train_tokens": sum(s.get("tokens", 0) for s in stages) if stages else None,
                "tokens_per_s": last.get("tokens_per_second"),
                "train_seconds": round(sum(s.get("wall_seconds", 0) for s in stages), 1) if stages else None,
                "peak_mem_mb": max((s.get("peak_gpu_mb") or s.get("peak_rss_mb") or 0) for s in stages) if stages else None,
                "final_train_loss": last.get("final_loss"),
                "eval_loss": ev.get("eval_loss"),
                "perplexity": ev.get("perplexity"),
            }
        )
        for name in metric_names:
            line[name] = (ev.get("metrics") or {}).get(name)
        line["status"] = r["status"]
        line["note"] = ""
        if r["error"]:
            parts = [p for p in (r["error"].get("where"), r["error"].get("error")) if p]
            if r["error"].get("log"):
                parts.append(f"log: {r['error']['log']}")
            line["note"] = "; ".join(parts)
        table.append(line)

    # delta against the matching baseline and the best mark
    baselines = {(r["config"]["model"], r["config"]["eval"]["data_id"]): r for r in rows if r["config"]["baseline"]}
    def value_of(line):
        value = line.get(primary)
        return value if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)) else None

    for r, line in zip(rows, table):
        base = baselines.get((r["config"]["model"], r["config"]["eval"]["data_id"]))
        base_line = table[rows.index(base)] if base is not None else None
        if base_line is not None and not r["config"]["baseline"] and value_of(line) is not None and value_of(base_line) is not None:
            line[f"delta_{primary}"] = value_of(line) - value_of(base_line)
        else:
            line[f"delta_{primary}"] = None
    candidates = [line for line in table if line["status"] == "ok" and value_of(line) is not None]
    best = None
    if candidates:
        pick = min if primary in LOWER_IS_BETTER else max
        best = pick(candidates, key=value_of)
    for line in table:
        line["best"] = "*" if line is best else ""

    columns = ["best", "experiment", "stages", *varied, "trainable_params", "train_tokens", "tokens_per_s",
               "train_seconds", "peak_mem_mb", "final_train_loss", "eval_loss", "perplexity", *metric_names,
               f"delta_{primary}", "status", "note"]
    return columns, table, {"primary": primary, "varied": varied, "best": best["experiment"] if best else None}


# --------------------------------------------------------------------------- plots


def read_scalars(tb_dir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} from TensorBoard event files; the last value per step wins."""
    if not os.path.isdir(tb_dir):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        by_step = {}
        for event in acc.Scalars(tag):
            by_step[event.step] = event.value
        out[tag] = sorted(by_step.items())
    return out


def make_plots(rows: list[dict], table: list[dict], info: dict, results: str, plot_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    curves = {}
    for r in rows:
        for stage in r["config"]["stages"]:
            scalars = read_scalars(os.path.join(results, r["experiment"], stage["name"], "tb"))
            label = r["experiment"] if len(r["config"]["stages"]) == 1 else f"{r['experiment']}/{stage['name']}"
            curves[label] = scalars
    for tag, title, filename in (("train/loss", "Training loss", "train_loss.png"), ("eval/loss", "Validation loss", "eval_loss.png")):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        drawn = 0
        for label, scalars in curves.items():
            points = scalars.get(tag)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], label=label, marker="." if len(points) < 30 else None)
                drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if drawn > 8 else 1)
        fig.tight_layout()
        fig.savefig(os.path.join(plot_dir, filename), dpi=110)
        plt.close(fig)
        written.append(filename)

    primary = info["primary"]
    values = [(line["experiment"], line.get(primary), line["status"]) for line in table]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(values) + 2), 4.5))
    names = [v[0] for v in values]
    heights = [v[1] if isinstance(v[1], (int, float)) and v[2] == "ok" else 0 for v in values]
    colors = ["#2b8a3e" if line["best"] else ("#c92a2a" if line["status"] != "ok" else "#4c6ef5") for line in table]
    ax.bar(range(len(names)), heights, color=colors)
    for i, (_, value, status) in enumerate(values):
        if status != "ok":
            ax.text(i, 0, status, ha="center", va="bottom", rotation=90, color="#c92a2a", fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(primary)
    ax.set_title(f"{primary} per experiment (green: best, red: not ok)")
    fig.tight_layout()
    fig.savefig(os.path.join(plot_dir, "primary_metric.png"), dpi=110)
    plt.close(fig)
    written.append("primary_metric.png")

    for key in info["varied"]:
        points = [(line.get(key), line.get(primary)) for line in table if line["status"] == "ok" and line.get(key) is not None]
        points = [(x, y) for x, y in points if isinstance(y, (int, float))]
        if len({json.dumps(x, default=str) for x, _ in points}) < 2:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _ in points)
        xs = [x if numeric else str(x) for x, _ in points]
        ax.scatter(xs, [y for _, y in points], color="#4c6ef5")
        if numeric and key.endswith("learning_rate"):
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(primary)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        filename = "vs_" + re.sub(r"[^A-Za-z0-9_.-]", "_", key) + ".png"
        fig.savefig(os.path.join(plot_dir, filename), dpi=110)
        plt.close(fig)
        written.append(filename)
    return written


# --------------------------------------------------------------------------- writers


def to_csv(columns: list[str], table: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for line in table:
        writer.writerow({c: _fmt(line.get(c), 8) if isinstance(line.get(c), float) else line.get(c) for c in columns})
    return buffer.getvalue()


def to_markdown(columns: list[str], table: list[dict], info: dict, title: str) -> str:
    out = [f"# {title}", ""]
    out.append(f"Primary metric: `{info['primary']}`; best: **{info['best'] or 'none'}** (marked `*`).")
    out.append("")
    out.append("| " + " | ".join(columns) + " |")
    out.append("|" + "---|" * len(columns))
    for line in table:
        out.append("| " + " | ".join(_fmt(line.get(c)).replace("|", "\\|") for c in columns) + " |")
    out.append("")
    return "\n".join(out)


SORT_SCRIPT = """
document.querySelectorAll('th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0];
    var rows = Array.from(body.rows);
    var asc = th.dataset.dir !== 'asc';
    th.dataset.dir = asc ? 'asc' : 'desc';
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
      var nx = parseFloat(x), ny = parseFloat(y);
      var cmp = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
      return asc ? cmp : -cmp;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #212529; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #dee2e6; padding: 4px 8px; text-align: right; white-space: nowrap; }
th { background: #f1f3f5; cursor: pointer; position: sticky; top: 0; }
td.text { text-align: left; }
tr.best { background: #d3f9d8; font-weight: 600; }
tr.diverged, tr.failed { background: #fff5f5; color: #c92a2a; }
img { max-width: 48%; margin: 1%; border: 1px solid #dee2e6; }
"""


def to_html(columns: list[str], table: list[dict], info: dict, plots: list[str], title: str) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for line in table:
        classes = " ".join(c for c in ("best" if line["best"] else "", line["status"] if line["status"] != "ok" else "") if c)
        cells = []
        for c in columns:
            value = line.get(c)
            text = _fmt(value)
            sort_value = value if isinstance(value, (int, float)) and not isinstance(value, bool) else text
            kind = "" if isinstance(value, (int, float)) and not isinstance(value, bool) else ' class="text"'
            cells.append(f'<td{kind} data-v="{html.escape(str(sort_value))}">{html.escape(text)}</td>')
        body.append(f'<tr class="{classes}">' + "".join(cells) + "</tr>")
    images = "\n".join(f'<img src="plots/{html.escape(p)}" alt="{html.escape(p)}">' for p in plots)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>Primary metric: <code>{html.escape(info['primary'])}</code>. Best: <b>{html.escape(info['best'] or 'none')}</b>
(green row). Rows that did not finish ok are red. Click a column header to sort.</p>
<table><thead><tr>{head}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table>
<h2>Plots</h2>
{images}
<script>{SORT_SCRIPT}</script>
</body></html>
"""


def write_report(results: str, logs: str, experiments: list[str], out_dir: str, title: str = "ftflow report") -> dict:
    rows = collect(results, logs, experiments)
    columns, table, info = build_table(rows)
    os.makedirs(out_dir, exist_ok=True)
    plot_dir = os.path.join(out_dir, "plots")
    with atomic_dir(plot_dir) as tmp:
        plots = make_plots(rows, table, info, results, tmp)
    write_text(os.path.join(out_dir, "report.md"), to_markdown(columns, table, info, title))
    write_text(os.path.join(out_dir, "report.html"), to_html(columns, table, info, plots, title))
    # summary.csv last: it is the step's completion marker
    write_text(os.path.join(out_dir, "summary.csv"), to_csv(columns, table))
    return {"rows": len(table), "best": info["best"], "primary": info["primary"], "plots": plots}
