"""The report's plots (matplotlib, PNG): loss curves, the primary metric per experiment, sweeps.

  train_loss.png       training loss of every experiment, from its TensorBoard events
  eval_loss.png        validation loss during training (only when some stage ran eval_strategy)
  {metric}.png         the primary metric (and eval loss) per experiment, best first, baseline as a line
  sweep_{metric}.png   the primary metric (and eval loss) against each varied setting

Diverged runs are drawn dashed, and the y axis is fitted to the runs that
finished, so one exploding loss does not flatten every other curve.
matplotlib and tensorboard are imported only when a plot is drawn.
"""

from __future__ import annotations

import math
import os
import textwrap

from ..paths import Layout
from .collect import Run
from .formatting import compact_float  # ticks spell values as the table does: 2e-4, 1.5e-3
from .table import Group, Row, Setting, Table

BEST = "#2b8a3e"
BAD = "#c92a2a"
BASELINE = "#868e96"
TUNED = "#4c6ef5"


def read_scalars(tb_dir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} from a folder of TensorBoard event files; the last value per step wins."""
    if not os.path.isdir(tb_dir):
        return {}
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # one INFO line per event file otherwise

    accumulator = EventAccumulator(tb_dir, size_guidance={"scalars": 0})  # 0: keep every point
    accumulator.Reload()
    out = {}
    for tag in accumulator.Tags().get("scalars", []):
        by_step = {event.step: event.value for event in accumulator.Scalars(tag)}
        out[tag] = sorted(by_step.items())
    return out


def loss_curves(layout: Layout, run: Run) -> dict[str, list[tuple[int, float]]]:
    """{"train/loss": points, "eval/loss": points} of one experiment, stages laid end to end.

    Stage k's steps are offset by the steps of the stages before it, so a
    curriculum reads left to right. Falls back to train_metrics.json's loss
    list when a stage has no event files (e.g. results copied without tb/).
    """
    curves: dict[str, list] = {"train/loss": [], "eval/loss": []}
    offset = 0
    for stage, metrics in zip(run.spec.stages, run.train_metrics):
        scalars = read_scalars(layout.tensorboard_dir(run.name, stage.name))
        if not scalars.get("train/loss") and metrics:
            scalars = {
                "train/loss": [(p["step"], p["loss"]) for p in metrics.get("losses", [])],
                "eval/loss": [(p["step"], p["eval_loss"]) for p in metrics.get("eval_losses", [])],
            }
        last = 0
        for tag in curves:
            points = scalars.get(tag) or []
            curves[tag].extend((offset + step, value) for step, value in points)
            last = max([last] + [step for step, _ in points])
        offset += (metrics or {}).get("steps") or last
    return curves


def _finite(values) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def _category(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(runs: list[Run], rows: dict[str, Row], layout: Layout, plot_dir: str) -> list[str]:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    curves = {run.name: loss_curves(layout, run) for run in runs if run.spec.stages}
    written = []
    for tag, title, filename in (
        ("train/loss", "Training loss", "train_loss.png"),
        ("eval/loss", "Validation loss during training", "eval_loss.png"),
    ):
        drawn = {name: c[tag] for name, c in curves.items() if c[tag]}
        if not drawn:
            continue
        fig, ax = plt.subplots(figsize=(9, 4.8))
        colors = plt.get_cmap("tab20").colors
        ok_values = []
        for i, (name, points) in enumerate(drawn.items()):
            row = rows[name]
            ok = row.status == "ok"
            if ok:
                ok_values.extend(_finite(v for _, v in points))
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                label=name + ("" if ok else f" ({row.status})"),
                color=colors[i % len(colors)],
                linestyle="-" if ok else "--",
                linewidth=2.6 if row.best else 1.2,
                marker="." if len(points) < 30 else None,
            )
        if ok_values:
            low, high = min(ok_values), max(ok_values)
            pad = 0.05 * (high - low or abs(high) or 1.0)
            ax.set_ylim(low - pad, high + pad)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(left=0)
        ax.set_xlabel("optimizer step (stages laid end to end)")
        ax.set_ylabel("loss (nats per label token)")
        ax.set_title(title + " (bold: best; dashed: did not finish ok)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if len(drawn) <= 20 else 2)
        fig.tight_layout()
        fig.savefig(os.path.join(plot_dir, filename), dpi=110)
        plt.close(fig)
        written.append(filename)
    return written


def plot_primary(group: Group, rows: list[Row], plot_dir: str) -> str:
    """The group's primary metric per experiment in table order (best first), beside eval loss.

    Dots rather than bars: a sweep's eval losses differ in the second decimal,
    which bars starting at zero would hide. Eval loss is drawn too because it
    breaks ties, e.g. when no run gets a single exact match yet.
    """
    plt = _pyplot()
    primary = group.primary
    members = [row for row in rows if row.group == group.key]
    metrics = [primary] + (["eval_loss"] if primary != "eval_loss" else [])
    height = max(2.6, 0.3 * len(members) + 1.3)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics) + 1.6, height), sharey=True, squeeze=False)
    positions = list(range(len(members)))
    colors = [
        BASELINE if row.baseline else BEST if row.best else TUNED if row.status == "ok" else BAD for row in members
    ]
    for ax, metric in zip(axes[0], metrics):
        values = [row.get(metric) if row.status == "ok" else None for row in members]
        shown = [
            (y, v, c) for y, v, c in zip(positions, values, colors) if isinstance(v, (int, float)) and math.isfinite(v)
        ]
        ax.hlines(
            [y for y, _, _ in shown], 0, 1, transform=ax.get_yaxis_transform(), color="#e9ecef", linewidth=0.8, zorder=1
        )
        ax.scatter([v for _, v, _ in shown], [y for y, _, _ in shown], c=[c for _, _, c in shown], s=40, zorder=3)
        for y, row in zip(positions, members):
            if row.status != "ok":
                ax.text(0.01, y, row.status, transform=ax.get_yaxis_transform(), va="center", fontsize=8, color=BAD)
        base = next(
            (row.get(metric) for row in members if row.baseline and isinstance(row.get(metric), (int, float))), None
        )
        if base is not None and math.isfinite(base):
            ax.axvline(base, color=BASELINE, linestyle="--", linewidth=1)
        distinct = {v for _, v, _ in shown}
        if len(distinct) == 1:
            ax.text(
                0.5, 1.01, f"every run: {next(iter(distinct)):.4g}", transform=ax.transAxes, ha="center", fontsize=8
            )
        better = (
            "lower is better"
            if metric in ("eval_loss", "perplexity") or (metric == primary and group.lower_is_better)
            else "higher is better"
        )
        ax.set_xlabel(f"{metric} ({better})", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.margins(x=0.08)
    axes[0][0].set_yticks(positions)
    axes[0][0].set_yticklabels([row.experiment for row in members], fontsize=8)
    axes[0][0].invert_yaxis()
    fig.suptitle(
        f"{primary} on {group.dataset}, best first (green: best, grey: untuned baseline, red: not ok)", fontsize=10
    )
    fig.tight_layout()
    filename = f"{primary}.png"
    fig.savefig(os.path.join(plot_dir, filename), dpi=110)
    plt.close(fig)
    return filename


def plot_sweep(group: Group, rows: list[Row], settings: list[Setting], plot_dir: str) -> str | None:
    """One panel per varied setting: the primary metric (and eval loss) of each finished run against it.

    Settings that move together (r and alpha tied at 4 x r) share one panel.
    """
    members = [row for row in rows if row.group == group.key and not row.baseline and row.status == "ok"]
    panels = []
    seen_partitions = {}
    for setting in settings:
        values = [row.settings.get(setting.key) for row in members]
        if len({repr(v) for v in values}) < 2:
            continue
        partition = tuple(
            sorted(tuple(i for i, v in enumerate(values) if repr(v) == r) for r in {repr(v) for v in values})
        )
        if partition in seen_partitions:  # moves exactly with an earlier setting
            seen_partitions[partition]["label"] += f" / {setting.short}"
            continue
        panel = {"label": setting.short, "values": values}
        seen_partitions[partition] = panel
        panels.append(panel)
    if not panels:
        return None
    primary = group.primary
    metrics = [m for m in dict.fromkeys([primary, "eval_loss"]) if len({repr(row.get(m)) for row in members}) > 1]
    if not metrics:
        return None
    plt = _pyplot()
    # At most 4 panels a row; each metric gets its own block of rows.
    columns = min(4, len(panels))
    rows_per_metric = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(
        rows_per_metric * len(metrics),
        columns,
        figsize=(3.3 * columns + 0.6, 2.7 * rows_per_metric * len(metrics) + 0.5),
        squeeze=False,
    )
    baseline = next((row for row in rows if row.group == group.key and row.baseline), None)
    for index, panel in enumerate(panels):
        xs = panel["values"]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        if not numeric:
            categories = sorted({_category(x) for x in xs})
            xs = [categories.index(_category(x)) for x in xs]
        for block, metric in enumerate(metrics):
            ax = axes[block * rows_per_metric + index // columns][index % columns]
            points = [
                (x, row.get(metric), row) for x, row in zip(xs, members) if isinstance(row.get(metric), (int, float))
            ]
            ax.scatter(
                [p[0] for p in points],
                [p[1] for p in points],
                color=[BEST if p[2].best else TUNED for p in points],
                s=22,
                zorder=3,
            )
            if (
                baseline is not None
                and isinstance(baseline.get(metric), (int, float))
                and math.isfinite(baseline.get(metric))
            ):
                ax.axhline(baseline.get(metric), color=BASELINE, linestyle="--", linewidth=1, label="baseline")
            if numeric:
                positive = [x for x in xs if x > 0]
                if len(positive) == len(xs) and max(positive) / min(positive) >= 4:
                    ax.set_xscale("log")  # learning rates, ranks, batch sizes: factors apart
                distinct = sorted(set(xs))
                if len(distinct) <= 8:  # a tick at each value tried, written as the table writes it
                    ax.minorticks_off()
                    ax.set_xticks(distinct)
                    ax.set_xticklabels(
                        [compact_float(x) if isinstance(x, float) else str(x) for x in distinct], fontsize=7
                    )
            else:
                ax.set_xticks(range(len(categories)))
                ax.set_xticklabels(categories, fontsize=8)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            ax.set_xlabel(panel["label"], fontsize=8)
            if index % columns == 0:
                ax.set_ylabel(metric, fontsize=8)
    for block in range(len(metrics)):  # blank the unused cells of each block
        for index in range(len(panels), rows_per_metric * columns):
            axes[block * rows_per_metric + index // columns][index % columns].set_visible(False)
    shown = " and ".join(metrics)
    title = f"{shown} against each varied setting (green: best, dashed: untuned baseline)"
    fig.suptitle(textwrap.fill(title, int((3.3 * columns + 0.6) * 11)), fontsize=10)  # ~11 characters an inch
    fig.tight_layout()
    filename = f"sweep_{primary}.png"
    fig.savefig(os.path.join(plot_dir, filename), dpi=100)
    plt.close(fig)
    return filename


def make_plots(runs: list[Run], table: Table, layout: Layout, plot_dir: str) -> list[str]:
    """Draw every plot into `plot_dir`; the file names written, in the order the report shows them."""
    written = plot_losses(runs, {row.experiment: row for row in table.rows}, layout, plot_dir)
    for group in table.groups:
        written.append(plot_primary(group, table.rows, plot_dir))
        sweep = plot_sweep(group, table.rows, table.settings, plot_dir)
        if sweep:
            written.append(sweep)
    return written
