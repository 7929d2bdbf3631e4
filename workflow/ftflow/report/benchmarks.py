"""The benchmarks in the report: lm-evaluation-harness results (eval.harness) beside the task metrics.

  columns     `harness.<task>.<metric>` per task's main metric, and its Δ against the untuned
              baseline of the same model (`delta_harness.<task>.<metric>`)
  headline    what the best run gained on its task and what it gained or lost on the benchmarks
  plot        benchmark_deltas.png: each tuned run's Δ per task
  stages      with eval.harness.every_stage, the benchmarks after each stage of a curriculum

A harness job that failed for this config (its log newer than its
harness-config.json, its harness.json missing or written for other settings)
turns an otherwise ok row `failed`, with the log's error line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..atomic import read_json
from ..paths import Layout
from ..specs import HarnessSpec
from .collect import Problem, Run, first_error
from .formatting import finite, format_value
from .table import Column, Table


@dataclass
class Benchmarks:
    """One run's harness results: the final model's, and (every_stage) after each earlier stage."""

    final: dict | None  # eval/harness.json's tasks, None when missing, stale or failed
    after_stage: dict[str, dict] = field(default_factory=dict)  # {stage: tasks}
    problem: Problem | None = None


def read_fresh_harness(path: str, spec: HarnessSpec) -> dict | None:
    """The tasks of a harness.json written for exactly these settings and this model, else None."""
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    recorded = (data.get("provenance") or {}).get("harness_hash")
    return data.get("tasks") if recorded == spec.harness_hash and data.get("status") == "ok" else None


def attach_benchmarks(layout: Layout, runs: list[Run]) -> None:
    """Read each run's harness results (runs without eval.harness tasks get none); a failed harness job
    turns an ok run `failed`, naming the job and its error."""
    for run in runs:
        spec_path = layout.harness_config(run.name)
        try:
            spec = HarnessSpec.read(spec_path)
        except (OSError, ValueError, TypeError):
            continue
        benchmarks = Benchmarks(final=read_fresh_harness(layout.harness_results(run.name), spec))
        for stage in spec.stages:
            tasks = read_fresh_harness(layout.harness_results(run.name, stage), spec)
            if tasks is not None:
                benchmarks.after_stage[stage] = tasks
        for stage in (*spec.stages, None):
            done = benchmarks.final if stage is None else benchmarks.after_stage.get(stage)
            log = layout.harness_log(run.name, stage)
            if done is None and os.path.exists(log) and os.path.getmtime(log) >= os.path.getmtime(spec_path):
                where = "harness" if stage is None else f"harness after {stage}"
                benchmarks.problem = Problem(where, first_error(log), log)
                break
        run.benchmarks = benchmarks
        if benchmarks.problem is not None and run.status == "ok":
            run.status, run.problem = "failed", benchmarks.problem


def benchmark_columns(runs: list[Run]) -> list[tuple[str, str]]:
    """(task, main metric) of every benchmark some run reports, in first-seen order."""
    seen: dict[tuple[str, str], None] = {}
    for run in runs:
        for task, values in ((run.benchmarks.final if run.benchmarks else None) or {}).items():
            seen[(task, values["main"])] = None
    return list(seen)


def cell_key(task: str, metric: str) -> str:
    return f"harness.{task}.{metric}"


def add_benchmarks(table: Table, runs: list[Run]) -> None:
    """Benchmark cells, their deltas against the untuned baseline of the same model, and their columns
    (after the task scores, before the settings)."""
    pairs = benchmark_columns(runs)
    if not pairs:
        return
    by_name = {run.name: run for run in runs}
    rows = {row.experiment: row for row in table.rows}
    for row in table.rows:
        tasks = (by_name[row.experiment].benchmarks.final or {}) if by_name[row.experiment].benchmarks else {}
        for task, metric in pairs:
            value = ((tasks.get(task) or {}).get("metrics") or {}).get(metric, {}).get("value")
            row.metrics[cell_key(task, metric)] = value
    for row in table.rows:
        base = baseline_of(row.experiment, by_name, rows)
        for task, metric in pairs:
            key = cell_key(task, metric)
            value, reference = finite(row.get(key)), finite(base.get(key)) if base else None
            row.deltas[f"delta_{key}"] = value - reference if value is not None and reference is not None else None
    columns = []
    for task, metric in pairs:
        key = cell_key(task, metric)
        columns.append(Column(key, f"{task} {metric}", "metric", f"lm-evaluation-harness {task}: {metric}"))
        columns.append(
            Column(f"delta_{key}", f"Δ {task}", "delta", f"{task} {metric} minus the untuned baseline's (same model)")
        )
    at = next(i for i, c in enumerate(table.columns) if c.key == "stages")
    table.columns[at:at] = columns
    table.benchmarks = pairs
    table.benchmark_stages = stage_table(runs)


def baseline_of(name: str, runs: dict[str, Run], rows: dict):
    """The row of the untuned baseline of the run's model that has benchmarks (the one on the run's own
    eval data first), or None for a baseline."""
    run = runs[name]
    if run.spec.baseline:
        return None
    candidates = [
        other
        for other in runs.values()
        if other.spec.baseline and other.spec.model == run.spec.model and other.benchmarks and other.benchmarks.final
    ]
    candidates.sort(key=lambda other: other.spec.eval.data_id != run.spec.eval.data_id)
    return rows[candidates[0].name] if candidates else None


def benchmark_headlines(table: Table) -> list[str]:
    """Per group with a best run: "lora-r16: exact_match +0.63, my_mc acc -0.02 against the untuned baseline"."""
    pairs = table.benchmarks
    lines = []
    for group in table.groups if pairs else []:
        for row in (r for r in table.rows if r.group == group.key and r.best):
            parts = []
            task_delta = row.get(f"delta_{group.primary}")
            if task_delta is not None:
                parts.append(f"{group.primary} {format_value('delta', task_delta)}")
            for task, metric in pairs:
                delta = row.get(f"delta_{cell_key(task, metric)}")
                if delta is not None:
                    parts.append(f"{task} {metric} {format_value('delta', delta)}")
            if len(parts) > (task_delta is not None):
                lines.append(f"{row.experiment}: {', '.join(parts)} against the untuned baseline.")
    return lines


def stage_table(runs: list[Run]) -> list[list[str]]:
    """Rows (experiment, after stage, then one cell per benchmark) of the runs with every_stage results."""
    pairs = benchmark_columns(runs)
    out = []
    for run in runs:
        benchmarks = run.benchmarks
        if not benchmarks or not benchmarks.after_stage:
            continue
        steps = [*benchmarks.after_stage.items()]
        if benchmarks.final is not None:
            steps.append((run.spec.stages[-1].name if run.spec.stages else "final", benchmarks.final))
        for stage, tasks in steps:
            cells = [
                format_value("metric", ((tasks.get(task) or {}).get("metrics") or {}).get(metric, {}).get("value"))
                for task, metric in pairs
            ]
            out.append([run.name, stage, *cells])
    return out


def plot_benchmark_deltas(table: Table, plot_dir: str) -> str | None:
    """benchmark_deltas.png: horizontal bars of each tuned run's Δ per benchmark (0 = the untuned baseline)."""
    pairs = table.benchmarks
    rows = [row for row in table.rows if not row.baseline]
    deltas = {(row.experiment, pair): finite(row.get(f"delta_{cell_key(*pair)}")) for row in rows for pair in pairs}
    if not any(v is not None for v in deltas.values()):
        return None
    from .plots import _pyplot

    plt = _pyplot()
    height = max(2.4, 0.28 * len(rows) * len(pairs) + 1.2)
    fig, ax = plt.subplots(figsize=(8, height))
    colors = plt.get_cmap("tab10").colors
    width = 0.8 / len(pairs)
    for j, pair in enumerate(pairs):
        ys = [i + j * width for i in range(len(rows))]
        values = [deltas[(row.experiment, pair)] for row in rows]
        color = colors[j % len(colors)]
        ax.barh(ys, [v or 0.0 for v in values], height=width, color=color, label=f"{pair[0]} {pair[1]}")
        for y, value in zip(ys, values):  # the number itself: a zero bar has no length to read
            text = "n/a" if value is None else format_value("delta", value)
            ax.annotate(text, (value or 0.0, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
    ax.axvline(0, color="#868e96", linewidth=1)
    ax.set_yticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_yticklabels([row.experiment for row in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("benchmark minus the untuned baseline (same model)", fontsize=9)
    ax.set_title("What fine-tuning did to the benchmarks (lm-evaluation-harness)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    filename = "benchmark_deltas.png"
    fig.savefig(os.path.join(plot_dir, filename), dpi=110)
    plt.close(fig)
    return filename
