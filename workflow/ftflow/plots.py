"""The report's plots (matplotlib, PNG): loss curves, the primary metric per experiment, sweeps.

  train_loss.png       training loss of every experiment, from its TensorBoard events
  eval_loss.png        validation loss during training (only when some stage ran eval_strategy)
  {metric}.png         the primary metric per experiment, best first, baseline as a line
  sweep_{metric}.png   the primary metric (and eval loss) against each varied setting

Diverged runs are drawn dashed, and the y axis is fitted to the runs that
finished, so one exploding loss does not flatten every other curve.
"""

from __future__ import annotations

import math
import os

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


def loss_curves(results: str, row: dict) -> dict[str, list[tuple[int, float]]]:
    """{"train/loss": points, "eval/loss": points} of one experiment, stages laid end to end.

    Stage k's steps are offset by the steps of the stages before it, so a
    curriculum reads left to right. Falls back to train_metrics.json's loss
    list when a stage has no event files (e.g. results copied without tb/).
    """
    curves: dict[str, list] = {"train/loss": [], "eval/loss": []}
    offset = 0
    for stage, metrics in zip(row["config"]["stages"], row["stages"]):
        scalars = read_scalars(os.path.join(results, row["experiment"], stage["name"], "tb"))
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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(rows: list[dict], lines: dict, results: str, plot_dir: str) -> list[str]:
    plt = _pyplot()
    curves = {row["experiment"]: loss_curves(results, row) for row in rows if row["config"]["stages"]}
    written = []
    for tag, title, filename in (("train/loss", "Training loss", "train_loss.png"), ("eval/loss", "Validation loss during training", "eval_loss.png")):
        drawn = {name: c[tag] for name, c in curves.items() if c[tag]}
        if not drawn:
            continue
        fig, ax = plt.subplots(figsize=(9, 4.8))
        colors = plt.get_cmap("tab20").colors
        ok_values = []
        for i, (name, points) in enumerate(drawn.items()):
            line = lines[name]
            ok = line["status"] == "ok"
            if ok:
                ok_values.extend(_finite(v for _, v in points))
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                label=name + ("" if ok else f" ({line['status']})"),
                color=colors[i % len(colors)],
                linestyle="-" if ok else "--",
                linewidth=2.6 if line["best"] else 1.2,
                marker="." if len(points) < 30 else None,
            )
        if ok_values:
            low, high = min(ok_values), max(ok_values)
            pad = 0.05 * (high - low or abs(high) or 1.0)
            ax.set_ylim(low - pad, high + pad)
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


def plot_primary(group: dict, table: list[dict], plot_dir: str) -> str:
    """Horizontal bars of the group's primary metric, in table order (best first)."""
    plt = _pyplot()
    primary = group["primary"]
    members = [line for line in table if line["_group"] == group["key"]]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.32 * len(members) + 1.2)))
    names, values, colors = [], [], []
    for line in members:
        value = line.get(primary)
        names.append(line["experiment"])
        values.append(value if isinstance(value, (int, float)) and math.isfinite(value) and line["status"] == "ok" else 0.0)
        colors.append(BASELINE if line["_baseline"] else BEST if line["best"] else TUNED if line["status"] == "ok" else BAD)
    positions = range(len(members))
    ax.barh(positions, values, color=colors)
    for y, line, value in zip(positions, members, values):
        text = line["status"] if line["status"] != "ok" else ("n/a" if line.get(primary) is None else f"{line[primary]:.4g}")
        ax.text(value, y, f" {text}", va="center", fontsize=7, color=BAD if line["status"] != "ok" else "#212529")
    base = next((line.get(primary) for line in members if line["_baseline"] and isinstance(line.get(primary), (int, float))), None)
    if base is not None:
        ax.axvline(base, color=BASELINE, linestyle="--", linewidth=1)
    ax.set_yticks(list(positions))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    better = "lower is better" if group["lower_is_better"] else "higher is better"
    ax.set_xlabel(f"{primary} on {group['dataset']} ({better})")
    ax.set_title(f"{primary} per experiment (green: best, grey: untuned baseline, red: not ok)", fontsize=10)
    ax.margins(x=0.15)
    fig.tight_layout()
    filename = f"{primary}.png"
    fig.savefig(os.path.join(plot_dir, filename), dpi=110)
    plt.close(fig)
    return filename


def plot_sweep(group: dict, table: list[dict], settings: list[dict], plot_dir: str) -> str | None:
    """One panel per varied setting: the primary metric (and eval loss) of each finished run against it.

    Settings that move together (r and alpha tied at 4 x r) share one panel.
    """
    members = [line for line in table if line["_group"] == group["key"] and not line["_baseline"] and line["status"] == "ok"]
    panels = []
    seen_partitions = {}
    for setting in settings:
        key = setting["key"]
        values = [line["_settings"].get(key) for line in members]
        if len({repr(v) for v in values}) < 2:
            continue
        partition = tuple(sorted(tuple(i for i, v in enumerate(values) if repr(v) == r) for r in {repr(v) for v in values}))
        if partition in seen_partitions:  # moves exactly with an earlier setting
            seen_partitions[partition]["label"] += f" / {setting['short']}"
            continue
        panel = {"key": key, "label": setting["short"], "values": values}
        seen_partitions[partition] = panel
        panels.append(panel)
    if not panels:
        return None
    primary = group["primary"]
    metrics = [primary] + (["eval_loss"] if primary != "eval_loss" else [])
    plt = _pyplot()
    fig, axes = plt.subplots(len(metrics), len(panels), figsize=(3.1 * len(panels) + 0.6, 2.8 * len(metrics) + 0.4), squeeze=False)
    baseline = next((line for line in table if line["_group"] == group["key"] and line["_baseline"]), None)
    for col, panel in enumerate(panels):
        xs = panel["values"]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        if not numeric:
            categories = sorted({str(x) for x in xs})
            xs = [categories.index(str(x)) for x in xs]
        for row, metric in enumerate(metrics):
            ax = axes[row][col]
            points = [(x, line.get(metric), line) for x, line in zip(xs, members) if isinstance(line.get(metric), (int, float))]
            ax.scatter([p[0] for p in points], [p[1] for p in points], color=[BEST if p[2]["best"] else TUNED for p in points], s=22, zorder=3)
            if baseline is not None and isinstance(baseline.get(metric), (int, float)) and math.isfinite(baseline[metric]):
                ax.axhline(baseline[metric], color=BASELINE, linestyle="--", linewidth=1, label="baseline")
            if numeric:
                positive = [x for x in xs if x > 0]
                if len(positive) == len(xs) and max(positive) / min(positive) >= 20:
                    ax.set_xscale("log")  # learning rates and other settings spread over decades
            else:
                ax.set_xticks(range(len(categories)))
                ax.set_xticklabels(categories, fontsize=8)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            if col == 0:
                ax.set_ylabel(metric, fontsize=8)
            if row == len(metrics) - 1:
                ax.set_xlabel(panel["label"], fontsize=8)
    fig.suptitle(f"{primary} and eval loss against each varied setting (green: best, dashed: baseline)", fontsize=10)
    fig.tight_layout()
    filename = f"sweep_{primary}.png"
    fig.savefig(os.path.join(plot_dir, filename), dpi=100)
    plt.close(fig)
    return filename


def make_plots(rows: list[dict], table: list[dict], groups: list[dict], settings: list[dict], results: str, plot_dir: str) -> list[str]:
    lines = {line["experiment"]: line for line in table}
    written = plot_losses(rows, lines, results, plot_dir)
    for group in groups:
        written.append(plot_primary(group, table, plot_dir))
        sweep = plot_sweep(group, table, settings, plot_dir)
        if sweep:
            written.append(sweep)
    return written

