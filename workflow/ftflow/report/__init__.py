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
numbers read), writers (csv, markdown, HTML) and plots (matplotlib); searches adds a section per search.

The Snakefile's `onerror` handler writes the same report to report/partial/
when jobs fail, so failed experiments show beside the ones that finished.
"""

from __future__ import annotations

import base64
import os
import shutil

from ..atomic import atomic_dir, write_text
from ..errors import FtflowError
from ..paths import Layout
from .benchmarks import add_benchmarks, attach_benchmarks, plot_benchmark_deltas
from .collect import collect_runs, where_line
from .plots import make_plots
from .searches import collect_searches, plot_search
from .searches import to_html as search_html
from .searches import to_markdown as search_markdown
from .table import build_table
from .writers import to_csv, to_html, to_markdown

# The onerror handler's report, inside the full report's folder (Layout.partial_report_dir).
PARTIAL_DIR = "partial"


def write_report(
    results: str, logs: str, experiments: list[str], out_dir: str, title: str = "ftflow report", searches=()
) -> dict:
    """Write the report of `experiments` and `searches` (their trials are rows too) to `out_dir`;
    a summary for the log: rows, best runs, primary metrics, plots."""
    layout = Layout(results, logs)
    found = collect_searches(layout, list(searches))
    trials = [name for result in found for name in result.experiments if name not in experiments]
    runs = collect_runs(layout, [*experiments, *dict.fromkeys(trials)])
    if not runs:
        raise FtflowError(f"no experiment of {', '.join(experiments) or '(none)'} has a config.json under {results}")
    attach_benchmarks(layout, runs)
    table = build_table(runs)
    add_benchmarks(table, runs)
    os.makedirs(out_dir, exist_ok=True)
    with atomic_dir(os.path.join(out_dir, "plots")) as tmp:
        plots = make_plots(runs, table, layout, tmp)
        plots += [name for name in [plot_benchmark_deltas(table, tmp)] if name]
        search_plots = {result.name: plot_search(result, tmp) for result in found}
    where = where_line(runs)
    markdown = to_markdown(table, plots, title, where)
    if found:
        markdown += "\n" + search_markdown(found, search_plots)
    write_text(os.path.join(out_dir, "report.md"), markdown)
    images = {}
    for name in [*plots, *search_plots.values()]:
        with open(os.path.join(out_dir, "plots", name), "rb") as handle:
            images[name] = handle.read()
    search_images = {
        s: "data:image/png;base64," + base64.b64encode(images[p]).decode() for s, p in search_plots.items()
    }
    sections = search_html(found, search_images) if found else ""
    page = to_html(table, {name: images[name] for name in plots}, title, out_dir, where, sections)
    write_text(os.path.join(out_dir, "report.html"), page)
    # summary.csv last: it marks the step complete
    write_text(os.path.join(out_dir, "summary.csv"), to_csv(table))
    # a full report supersedes the partial one an earlier failed run left beside it
    shutil.rmtree(os.path.join(out_dir, PARTIAL_DIR), ignore_errors=True)
    return {
        "rows": len(table.rows),
        "best": [name for group in table.groups for name in group.best],
        "primary": [group.primary for group in table.groups],
        "plots": plots,
        "searches": [result.name for result in found],
    }
