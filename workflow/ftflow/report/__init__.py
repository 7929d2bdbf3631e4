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

The modules, in the order the data flows: collect (runs from disk), settings
(which settings a run has), table (typed rows, ranked), formatting (how
numbers read), writers (csv, markdown, HTML) and plots (matplotlib).

The Snakefile's `onerror` handler writes the same report to report/partial/
when jobs fail, so failed experiments show beside the ones that finished.
"""

from __future__ import annotations

import os
import shutil

from ..atomic import atomic_dir, write_text
from ..errors import FtflowError
from ..paths import Layout
from .collect import collect_runs, where_line
from .plots import make_plots
from .table import build_table
from .writers import to_csv, to_html, to_markdown

# The onerror handler's report, inside the full report's folder (Layout.partial_report_dir).
PARTIAL_DIR = "partial"


def write_report(results: str, logs: str, experiments: list[str], out_dir: str, title: str = "ftflow report") -> dict:
    """Write the report of `experiments` to `out_dir`; a summary for the log: rows, best runs, primary metrics, plots."""
    layout = Layout(results, logs)
    runs = collect_runs(layout, experiments)
    if not runs:
        raise FtflowError(f"no experiment of {', '.join(experiments) or '(none)'} has a config.json under {results}")
    table = build_table(runs)
    os.makedirs(out_dir, exist_ok=True)
    with atomic_dir(os.path.join(out_dir, "plots")) as tmp:
        plots = make_plots(runs, table, layout, tmp)
    write_text(os.path.join(out_dir, "report.md"), to_markdown(table, plots, title, where_line(runs)))
    images = {}
    for name in plots:
        with open(os.path.join(out_dir, "plots", name), "rb") as handle:
            images[name] = handle.read()
    write_text(os.path.join(out_dir, "report.html"), to_html(table, images, title, where_line(runs)))
    # summary.csv last: it marks the step complete
    write_text(os.path.join(out_dir, "summary.csv"), to_csv(table))
    # a full report supersedes the partial one an earlier failed run left beside it
    shutil.rmtree(os.path.join(out_dir, PARTIAL_DIR), ignore_errors=True)
    return {
        "rows": len(table.rows),
        "best": [name for group in table.groups for name in group.best],
        "primary": [group.primary for group in table.groups],
        "plots": plots,
    }
