"""The table as files: summary.csv for scripts, report.md for reading in a terminal or a PR, report.html to explore.

The HTML page stands alone (plots embedded, its style and the sort-on-click
script inlined from static/report.css and static/report.js), so it can be
mailed or packed by `snakemake --report` and still work.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
from importlib import resources

from .benchmarks import benchmark_headlines
from .formatting import finite, format_value
from .table import LOWER_IS_BETTER, Row, Table, headline

NOTE_WIDTH = 90  # characters of a note in the markdown table; the HTML wraps it instead
WRAPPED = ("note", "data_loss")  # the columns of sentences, clipped or wrapped


def to_csv(table: Table) -> str:
    """Full setting keys and unrounded numbers, for scripts and spreadsheets."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([column.key for column in table.columns])
    for row in table.rows:
        cells = []
        for column in table.columns:
            value = row.get(column.key)
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, (list, dict)):
                value = json.dumps(value, ensure_ascii=False)
            cells.append("" if value is None else value)
        writer.writerow(cells)
    return buffer.getvalue()


def _problems(table: Table) -> list[Row]:
    return [row for row in table.rows if row.status != "ok"]


def _abbreviations(table: Table) -> str:
    return "; ".join(f"{s.short} = {s.key}" for s in table.settings if s.short != s.key)


def _shared_text(table: Table) -> list[str]:
    return [
        f"{key}: {'none' if value is None else format_value('setting', value)}" for key, value in table.shared.items()
    ]


def _clip(text: str, width: int = NOTE_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def to_markdown(table: Table, plots: list[str], title: str, where: str = "") -> str:
    columns = [c for c in table.columns if c.key != "log"]  # the list of unfinished runs names the logs
    out = [f"# {title}", ""]
    out += [f"- {headline(group, table)}" for group in table.groups]
    out += [f"- {line}" for line in benchmark_headlines(table)]
    out.append("")
    if where:  # host or image (collect.where_line)
        out += [where, ""]
    out.append("| " + " | ".join(c.label for c in columns) + " |")
    out.append("|" + "|".join("---" if c.kind == "text" else "--:" for c in columns) + "|")
    for row in table.rows:
        cells = []
        for column in columns:
            text = format_value(column.kind, row.get(column.key))
            text = _clip(text) if column.key in WRAPPED else text
            cells.append(f"**{text}**" if row.best and column.key == "experiment" else text.replace("|", "\\|"))
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    if _abbreviations(table):
        out += [f"Columns: {_abbreviations(table)}.", ""]
    problems = _problems(table)
    if problems:
        out += ["## Runs that did not finish", ""]
        for row in problems:
            where = f" (log: `{row.log}`)" if row.log else ""
            out.append(f"- **{row.experiment}**: {row.status}; {row.note or 'no error recorded'}{where}")
        out.append("")
    out += _stage_markdown(table)
    finished_logs = [row for row in table.rows if row.log and row.status == "ok"]
    if finished_logs:
        out += ["## Job logs", "", "Training progress (step, loss, tokens/s, ETA) or evaluation, per run:", ""]
        out += [f"- {row.experiment}: `{row.log}`" for row in finished_logs]
        out.append("")
    if table.shared:
        out += [
            "## Settings shared by every tuned experiment",
            "",
            ", ".join(f"`{t}`" for t in _shared_text(table)),
            "",
        ]
    if plots:
        out += ["## Plots", ""] + [f"![{p}](plots/{p})" for p in plots] + [""]
    return "\n".join(out)


def _stage_header(table: Table) -> list[str]:
    return ["experiment", "after stage", *(f"{task} {metric}" for task, metric in table.benchmarks)]


def _stage_markdown(table: Table) -> list[str]:
    """The benchmarks after each stage of a curriculum (eval.harness.every_stage), when some run has them."""
    if not table.benchmark_stages:
        return []
    header = _stage_header(table)
    out = ["## Benchmarks after each stage", "", "| " + " | ".join(header) + " |"]
    out.append("|---|---|" + "--:|" * (len(header) - 2))
    out += ["| " + " | ".join(cells) + " |" for cells in table.benchmark_stages]
    return out + [""]


def _stage_html(table: Table) -> str:
    if not table.benchmark_stages:
        return ""
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in _stage_header(table))
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>" for cells in table.benchmark_stages)
    return f'<h2>Benchmarks after each stage</h2><table class="runs"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _static(name: str) -> str:
    return resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")


def _delta_class(key: str, value) -> str:
    """`better` or `worse` for a delta cell, by whether its metric is better lower or higher."""
    number = finite(value)
    if not key.startswith("delta_") or number is None or number == 0:
        return ""
    lower = key[len("delta_") :] in LOWER_IS_BETTER
    return "better" if (number < 0) == lower else "worse"


def _html_row(row: Row, table: Table, report_dir: str | None) -> str:
    esc = html.escape
    classes = ["best" if row.best else "", "baseline" if row.baseline else "", row.status.replace(" ", "")]
    cells = []
    for key, _, kind, _ in table.columns:
        value = row.get(key)
        text = format_value(kind, value)
        number = finite(value)
        # data-v is what a click sorts by: the number itself, or the text; empty cells sort last
        sort_value = repr(number) if number is not None else ("" if value in (None, "") else text)
        css = " ".join(
            c
            for c in ("text" if number is None else "", "note" if key in WRAPPED else "", _delta_class(key, value))
            if c
        )
        title_attr = f' title="{esc(str(value))}"' if kind in ("count", "setting") and value is not None else ""
        class_attr = f' class="{css}"' if css else ""
        if key == "log" and value:
            # a link relative to the report's folder, so it opens from the page where it lies
            href = os.path.relpath(value, report_dir) if report_dir else value
            text_html = f'<a href="{esc(href)}">{esc(text)}</a>'
        else:
            text_html = esc(text)
        cells.append(f'<td{class_attr} data-v="{esc(sort_value)}"{title_attr}>{text_html}</td>')
    return f'<tr class="{" ".join(c for c in classes if c and c != "ok")}">' + "".join(cells) + "</tr>"


def to_html(
    table: Table,
    plots: dict[str, bytes],
    title: str,
    report_dir: str | None = None,
    where: str = "",
    sections: str = "",
) -> str:
    """The report page; `report_dir`, the folder it is written to, makes the log links relative to it;
    `where` says where the runs ran (host or image); `sections`, more HTML (a search's section) before the plots."""
    esc = html.escape
    head = "".join(
        f'<th title="{esc(description)}"{" class=setting" if kind == "setting" else ""}>{esc(label)}</th>'
        for _, label, kind, description in table.columns
    )
    body = [_html_row(row, table, report_dir) for row in table.rows]
    headlines = "".join(f"<li>{esc(headline(group, table))}</li>" for group in table.groups)
    headlines += "".join(f"<li>{esc(line)}</li>" for line in benchmark_headlines(table))
    abbreviations = (
        f"<p><small>Columns: {esc(_abbreviations(table))}. Hover a header for its meaning.</small></p>"
        if _abbreviations(table)
        else ""
    )
    shared = ""
    if table.shared:
        shared = (
            "<details><summary>Settings shared by every tuned experiment</summary><p>"
            + ", ".join(f"<code>{esc(t)}</code>" for t in _shared_text(table))
            + "</p></details>"
        )
    # Plots are embedded, so the page stands alone (mailed, or inside `snakemake --report`).
    images = "\n".join(
        f'<img src="data:image/png;base64,{base64.b64encode(data).decode()}" alt="{esc(name)}" title="plots/{esc(name)}"'
        f"{'' if name.endswith('loss.png') else ' class=wide'}>"
        for name, data in plots.items()
    )
    newline = "\n"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title><style>{newline}{_static("report.css")}</style></head>
<body>
<h1>{esc(title)}</h1>
<ul class="headlines">{headlines}</ul>
{f"<p class=where>{esc(where)}</p>" if where else ""}
<p><small>Green row: best tuned run; grey italic: untuned baseline; red: did not finish ok. Click a column header to sort.</small></p>
<div class="wrap"><table class="runs"><thead><tr>{head}</tr></thead><tbody>
{newline.join(body)}
</tbody></table></div>
{abbreviations}
{_stage_html(table)}
{shared}
{sections}
<h2>Plots</h2>
<div class="plots">
{images}
</div>
<script>{newline}{_static("report.js")}</script>
</body></html>
"""
