"""The ranked table: one typed Row per run, grouped by eval data, ranked, with deltas and a headline.

Rows are grouped by (eval dataset, primary metric), since only runs scored on
the same data by the same metric can be ranked against each other. Within a
group the finished runs are sorted by the primary metric, ties broken by eval
loss; a baseline is ranked with the rest, so a reader sees when no tuned run
beats it, but it is never marked best. Unfinished runs come last.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

from ..metrics import metric_value
from ..specs import StageSpec
from .collect import Run
from .formatting import finite, format_value
from .settings import column_order, experiment_settings, short_names

LOWER_IS_BETTER = {"eval_loss", "perplexity", "invalid_json", "invalid_json_rate"}
STATUS_ORDER = ("ok", "diverged", "failed", "not run")
HIDDEN_METRICS = {"invalid_json_rate"}  # invalid_json (the count) is shown instead


class Column(NamedTuple):
    key: str  # the Row cell it shows, and the csv header
    label: str  # markdown and HTML header
    kind: str  # how its numbers are spelled (formatting.format_value)
    description: str  # the HTML header's tooltip


# Cost after the settings, then losses.
COST_COLUMNS = (
    Column("trainable_params", "trainable", "count", "trainable parameters (last stage)"),
    Column("steps", "steps", "int", "optimizer steps, all stages"),
    Column("train_tokens", "train tokens", "count", "tokens trained on, all stages (packed: no padding)"),
    Column("tokens_per_s", "tokens/s", "rate", "training throughput: train tokens / train time"),
    Column("train_seconds", "train time", "seconds", "training wall time, all stages"),
    Column("peak_mem_mb", "peak mem", "mb", "peak memory: allocated GPU memory on a GPU, process RSS on a CPU"),
)
LOSS_COLUMNS = (
    Column("final_train_loss", "train loss", "loss", "training loss at the last logged step"),
    Column("eval_loss", "eval loss", "loss", "mean cross-entropy per label token on the loss split"),
    Column("perplexity", "ppl", "loss", "exp(eval loss)"),
)


@dataclass(kw_only=True)
class Row:
    """One line of the table: its displayed cells are named fields (or, for the columns a run set
    decides, the `metrics`, `deltas` and `varied` dicts); `row[key]` reads a cell by column key.
    The fields after them are private: what ranking, the headline and the plots need."""

    experiment: str
    status: str
    stages: str  # method, or stage:method per stage
    note: str
    log: str
    data_loss: str = ""  # splits of its data that lost over 5% of their rows in tokenization
    trainable_params: int | None = None
    steps: int | None = None
    train_tokens: int | None = None
    tokens_per_s: float | None = None
    train_seconds: float | None = None
    peak_mem_mb: float | None = None
    final_train_loss: float | None = None
    eval_loss: float | None = None
    perplexity: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # numeric task metrics of eval/metrics.json
    deltas: dict[str, float | None] = field(default_factory=dict)  # delta_{primary}: against the baseline
    varied: dict[str, Any] = field(default_factory=dict)  # the varied settings, by full key
    best: bool = False
    rank: int | None = None
    # private
    baseline: bool
    settings: dict  # every setting of the run (settings.experiment_settings)
    group: tuple[str, str]  # (eval dataset, primary metric)
    base_key: tuple[str, str]  # (model, eval data_id): the baseline it is compared with

    # the cells that are fields of their own (best is shown as `*` or blank)
    FIXED: ClassVar[tuple[str, ...]] = ("experiment", "status", "stages", "note", "log", "data_loss", "rank") + tuple(
        c.key for c in COST_COLUMNS + LOSS_COLUMNS
    )

    def get(self, key: str, default=None):
        """The cell of column `key`, or `default` when this row has none."""
        if key == "best":
            return "*" if self.best else ""
        if key in self.FIXED:
            return getattr(self, key)
        for cells in (self.deltas, self.metrics, self.varied):
            if key in cells:
                return cells[key]
        return default

    def __getitem__(self, key: str):
        missing = object()
        value = self.get(key, missing)
        if value is missing:
            raise KeyError(key)
        return value

    def __contains__(self, key: str) -> bool:
        return (
            key == "best"
            or key in self.FIXED
            or any(key in cells for cells in (self.deltas, self.metrics, self.varied))
        )


@dataclass
class Group:
    """Runs scored on one eval dataset by one primary metric."""

    key: tuple[str, str]
    dataset: str
    primary: str
    lower_is_better: bool
    tie_on_primary: bool = False  # the tuned runs all score the same: eval loss decided
    all_tied: bool = False  # on eval loss too: no best row
    best: list[str] = field(default_factory=list)
    baseline_value: float | None = None


class Setting(NamedTuple):
    key: str  # full dotted key, stage/ first when there are stages
    short: str  # column label


@dataclass
class Table:
    columns: list[Column]
    rows: list[Row]  # display order
    groups: list[Group]
    settings: list[Setting]  # the varied settings, in column order
    shared: dict  # what every tuned experiment has in common, folded under the table
    benchmarks: list = field(default_factory=list)  # (task, metric) of the harness columns (report.benchmarks)
    benchmark_stages: list = field(default_factory=list)  # rows of the benchmarks after each stage (every_stage)


def stages_text(run: Run) -> str:
    """`lora`, or `pt:lora > sft:full` per stage; a stage on a mixture names it: `sft:lora[general-zh 0.2 + my-sft]`."""
    stages = run.spec.stages
    if not stages:
        return "untuned"

    def text(stage: StageSpec) -> str:
        mixture = f"[{stage.data_text}]" if stage.is_mixture else ""
        return (stage.method if len(stages) == 1 else f"{stage.name}:{stage.method}") + mixture

    return " > ".join(text(stage) for stage in stages)


def data_loss_text(warnings: list[dict]) -> str:
    """'colmap train: 30% of rows dropped (over_length, missing_column)', per warning."""
    return "; ".join(
        f"{w['dataset']} {w['split']}: {w['share']:.0%} of rows dropped ({', '.join(w['reasons'])})" for w in warnings
    )


def make_row(run: Run, settings: dict) -> Row:
    """The row of one run: costs summed over its finished stages, scores from its evaluation."""
    evaluation = run.eval_metrics or {}
    done = run.finished_stages
    tokens = sum(m.get("tokens") or 0 for m in done)
    seconds = sum(m.get("wall_seconds") or 0 for m in done)
    peaks = [m.get("peak_gpu_mb") or m.get("peak_rss_mb") for m in done]
    problem = run.problem
    parts = [p for p in (problem.where, problem.error) if p] if problem else []
    spec = run.spec
    primary = spec.eval.primary_metric or "eval_loss"
    note = f"waits for {problem.where}" if run.status == "not run" else ": ".join(parts)
    if run.status == "ok" and finite(metric_value(evaluation, primary)) is None:
        note = f"evaluate: eval/metrics.json has no {primary} number, so this run is not ranked"
    return Row(
        experiment=run.name,
        status=run.status,
        stages=stages_text(run),
        note=note,
        log=run.log or "",
        data_loss=data_loss_text(run.data_warnings),
        trainable_params=done[-1].get("trainable_parameters") if done else None,
        steps=sum(m.get("steps") or 0 for m in done) if done else None,
        train_tokens=tokens if done else None,
        tokens_per_s=tokens / seconds if done and seconds else None,
        train_seconds=seconds if done else None,
        peak_mem_mb=max((p for p in peaks if p), default=None),
        final_train_loss=done[-1].get("final_loss") if done else None,
        eval_loss=evaluation.get("eval_loss"),
        perplexity=evaluation.get("perplexity"),
        # per_field is a dict: metrics.json has it, the table does not
        metrics={
            k: v
            for k, v in (evaluation.get("metrics") or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        },
        baseline=spec.baseline,
        settings=settings,
        group=(spec.eval.dataset, spec.eval.primary_metric or "eval_loss"),
        base_key=(spec.model, spec.eval.data_id),
    )


def rank_group(group: Group, rows: list[Row]) -> list[Row]:
    """Mark the best tuned row(s), rank the tuned rows and return the group's rows in table order."""
    primary = group.primary
    sign = 1.0 if group.lower_is_better else -1.0

    def sort_key(row: Row):
        loss = finite(row.eval_loss)
        return (sign * finite(row.get(primary)), loss if loss is not None else math.inf)

    scored = [row for row in rows if row.status == "ok" and finite(row.get(primary)) is not None]
    scored.sort(key=lambda row: (*sort_key(row), row.baseline))  # a tie puts the tuned row first
    tuned = [row for row in scored if not row.baseline]
    group.tie_on_primary = len(tuned) > 1 and len({finite(row.get(primary)) for row in tuned}) == 1
    previous, rank = None, 0
    for position, row in enumerate(tuned, start=1):
        key = sort_key(row)
        rank = rank if key == previous else position  # competition ranking: 1, 1, 3
        previous = key
        row.rank = rank
    winners = [row for row in tuned if row.rank == 1]
    group.all_tied = len(tuned) > 1 and len(winners) == len(tuned)
    if not group.all_tied:
        for row in winners:
            row.best = True
    group.best = [row.experiment for row in winners] if not group.all_tied else []
    rest = [row for row in rows if row not in scored]
    rest.sort(key=lambda row: STATUS_ORDER.index(row.status) if row.status in STATUS_ORDER else len(STATUS_ORDER))
    return scored + rest


def varied_settings(runs: list[Run], settings: dict[str, dict]) -> tuple[list[str], dict]:
    """(keys that differ between tuned experiments in column order, {key: value} of those they share)."""
    tuned = [run for run in runs if not run.spec.baseline]
    keys = sorted({key for run in tuned for key in settings[run.name]})
    varied = [k for k in keys if len({json.dumps(settings[run.name].get(k), sort_keys=True) for run in tuned}) > 1]
    varied = [k for k in varied if k.rpartition("/")[2] != "method"]  # the stages column shows methods
    varied.sort(key=column_order)
    shared = {k: settings[tuned[0].name].get(k) for k in keys if k not in varied} if tuned else {}
    return varied, shared


def add_deltas(rows: list[Row], groups: list[Group]) -> None:
    """Each tuned row's primary metric minus its baseline's (same model, same eval data)."""
    baselines = {row.base_key: row for row in rows if row.baseline}
    for row in rows:
        primary = row.group[1]
        base = baselines.get(row.base_key)
        value, reference = finite(row.get(primary)), finite(base.get(primary) if base else None)
        row.deltas[f"delta_{primary}"] = (
            value - reference if not row.baseline and value is not None and reference is not None else None
        )
    for group in groups:
        base = next((row for row in rows if row.group == group.key and row.baseline), None)
        group.baseline_value = finite(base.get(group.primary) if base else None)


def build_table(runs: list[Run]) -> Table:
    """The table: columns, rows in display order, groups, the varied and the shared settings."""
    settings = {run.name: experiment_settings(run.spec) for run in runs}
    varied, shared = varied_settings(runs, settings)
    rows = []
    for run in runs:
        row = make_row(run, settings[run.name])
        row.varied = {k: settings[run.name].get(k) for k in varied}
        rows.append(row)

    metric_names: list[str] = []
    for run in runs:
        for key, value in ((run.eval_metrics or {}).get("metrics") or {}).items():
            if isinstance(value, (int, float)) and key not in metric_names and key not in HIDDEN_METRICS:
                metric_names.append(key)

    groups, ordered = [], []
    for key in dict.fromkeys(row.group for row in rows):
        dataset, primary = key
        group = Group(key=key, dataset=dataset, primary=primary, lower_is_better=primary in LOWER_IS_BETTER)
        ordered.extend(rank_group(group, [row for row in rows if row.group == key]))
        groups.append(group)
    add_deltas(rows, groups)

    taken = (
        {"best", "rank", "experiment", "stages", "status", "note", "log"}
        | {c.key for c in COST_COLUMNS + LOSS_COLUMNS}
        | set(metric_names)
    )
    labels = short_names(varied, taken)
    setting_columns = [Setting(key, labels[key]) for key in varied]
    primaries = list(dict.fromkeys(group.primary for group in groups))
    columns = table_columns(primaries, metric_names, setting_columns)
    for key in ("log", "data_loss"):  # columns only some reports need
        if not any(row.get(key) for row in rows):
            columns = [c for c in columns if c.key != key]
    return Table(columns=columns, rows=ordered, groups=groups, settings=setting_columns, shared=shared)


def table_columns(primaries: list[str], metric_names: list[str], varied: list[Setting]) -> list[Column]:
    """The answer first (who, whether it finished, its score, its margin), then why
    (stages and the varied settings), then what it cost, then everything else."""
    losses = {c.key: c for c in LOSS_COLUMNS}

    def score_column(name: str) -> Column:
        return losses.get(name) or Column(name, name, "metric", f"task metric {name} on the generated answers")

    return [
        Column("best", "best", "text", "* marks the best tuned row by the primary metric"),
        Column("rank", "rank", "int", "rank of the tuned rows by the primary metric, ties broken by eval loss"),
        Column("experiment", "experiment", "text", "experiment name"),
        Column("status", "status", "text", "ok, diverged, failed or not run"),
        *[score_column(p) for p in primaries],
        *[Column(f"delta_{p}", f"Δ {p}", "delta", f"{p} minus the untuned baseline's") for p in primaries],
        *([losses["eval_loss"]] if "eval_loss" not in primaries else []),
        Column(
            "stages",
            "stages",
            "text",
            "method, or stage:method per stage; [a 0.2 + b]: a mixture, concatenated by weight ([a | b]: interleaved)",
        ),
        *[Column(s.key, s.short, "setting", s.key) for s in varied],
        *COST_COLUMNS,
        *[c for c in LOSS_COLUMNS if c.key not in primaries and c.key != "eval_loss"],
        *[score_column(name) for name in metric_names if name not in primaries],
        Column(
            "data_loss",
            "lossy data",
            "text",
            "splits of the run's data that lost over 5% of their rows in tokenization (stats.json warnings)",
        ),
        Column("note", "note", "text", "where and why a run did not finish ok"),
        Column(
            "log",
            "log",
            "text",
            "job log: the failed job's, else the training log (step, loss, tokens/s, ETA), else the evaluation's",
        ),
    ]


def headline(group: Group, table: Table) -> str:
    """One sentence per group: who won, by how much, and with which settings."""
    primary, rows = group.primary, [row for row in table.rows if row.group == group.key]
    tuned = [row for row in rows if not row.baseline]
    finished = [row for row in tuned if row.status == "ok"]
    base = next((row for row in rows if row.baseline), None)
    text = f"{primary} on {group.dataset} ({'lower' if group.lower_is_better else 'higher'} is better): "
    if not finished:
        return text + "no tuned run finished."
    if group.all_tied:
        return text + f"all {len(finished)} finished runs tie, on eval loss too; no best row." + lossy_text(rows)
    best = [row for row in rows if row.best]
    if not best:  # finished, but without the number that ranks them
        return text + f"no finished tuned run reports {primary}; see the notes." + lossy_text(rows)
    kind = "loss" if group.lower_is_better else "metric"
    names = ", ".join(row.experiment for row in best)
    if group.tie_on_primary:
        # the primary metric does not tell the runs apart: say so, and show what did
        text += (
            f"every finished run scores {format_value(kind, best[0].get(primary))}, so eval loss decides: best {names}"
        )
        text += f" at eval loss {format_value('loss', best[0].eval_loss)}"
        if base is not None and finite(base.eval_loss) is not None:
            text += f" (untuned baseline {format_value('loss', base.eval_loss)})"
    else:
        text += f"best {names} at {format_value(kind, best[0].get(primary))}"
        if group.baseline_value is not None:
            delta = best[0].get(f"delta_{primary}")
            text += f" ({format_value('delta', delta)} against the untuned baseline's {format_value(kind, group.baseline_value)})"
        if len(best) > 1:
            text += ", a tie"
    if base is not None and finite(base.get(primary)) is not None and not group.tie_on_primary:
        if rows.index(base) < rows.index(best[0]):
            text += "; no tuned run beats the untuned baseline"
    # settings the best run has (an AdaLoRA-only key is no setting of a LoRA run)
    chosen = [
        f"{s.short} {format_value('setting', best[0].settings[s.key])}"
        for s in table.settings
        if best[0].settings.get(s.key) is not None
    ]
    if chosen:
        text += ". Its settings: " + ", ".join(chosen)
    not_ok = [row for row in tuned if row.status != "ok"]
    if not_ok:
        text += ". Not finished: " + ", ".join(f"{row.experiment} ({row.status})" for row in not_ok)
    return text + "." + lossy_text(rows)


def lossy_text(rows: list[Row]) -> str:
    """The headline's note on runs whose data lost over 5% of a split's rows in tokenization."""
    lossy = [row.experiment for row in rows if row.data_loss]
    if not lossy:
        return ""
    return f" Lossy data (over 5% of a split's rows dropped in tokenization): {', '.join(lossy)}; see the lossy data column."
