"""The report's section per search: its rounds, its best trial, the boundary it found, a plot.

Read from results/search/{search}/: best.json (ftflow.search.finish_search) and
round-{k}.json (one per round: each trial's settings, budget, experiment, state
and value). A search's trials are experiments, so they are rows of the main
table too; this section says how the search got there.

  search_{search}.png   the search's metric by trial number, coloured by round,
                        diverged and failed trials marked at the bottom
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass

from ..atomic import read_json
from ..paths import Layout
from .formatting import compact_float, format_value

ROUND_COLOURS = ("#4c6ef5", "#2b8a3e", "#e67700", "#862e9c", "#1098ad", "#c2255c")
BAD = "#c92a2a"


@dataclass
class SearchResult:
    name: str
    best: dict  # best.json
    rounds: list[dict]  # round-{k}.json, in order

    @property
    def trials(self) -> list[dict]:
        return [dict(t, round=doc["round"], kind=doc["kind"]) for doc in self.rounds for t in doc["trials"]]

    @property
    def experiments(self) -> list[str]:
        """The experiments that ran the trials, each once, in trial order."""
        return list(dict.fromkeys(t["experiment"] for t in self.trials))


def collect_searches(layout: Layout, names: list[str]) -> list[SearchResult]:
    """The finished searches among `names` (a search without best.json is not finished and is left out)."""
    out = []
    for name in names:
        try:
            best = read_json(layout.search_best(name))
        except (OSError, ValueError):
            continue
        rounds = []
        k = 0
        while os.path.exists(layout.search_round(name, k)):
            rounds.append(read_json(layout.search_round(name, k)))
            k += 1
        out.append(SearchResult(name, best, rounds))
    return out


def _settings_text(settings: dict) -> str:
    return ", ".join(f"{key}={_value(value)}" for key, value in settings.items())


def _value(value) -> str:
    return compact_float(value) if isinstance(value, float) else format_value("setting", value)


def _budget_text(budget: dict) -> str:
    return ", ".join(f"{k}={_value(v)}" for k, v in budget.items()) if budget else "base"


def boundary_lines(result: SearchResult) -> list[str]:
    """ "diverged at training.learning_rate ≥ 1.6e-3 in 3 of 3 trials", clearest first; said too when
    no trial that ran diverged, so a missing line is never read as a boundary nobody looked for."""
    lines = [
        f"diverged at {b['setting']} ≥ {_value(b['at_or_above'])} in {b['diverged']} of {b['of']} trials"
        for b in result.best.get("boundary") or []
    ]
    states = result.best.get("states") or {}
    ran = states.get("complete", 0) + states.get("diverged", 0)
    if not lines and ran and not states.get("diverged"):
        lines.append(f"no boundary: none of the {ran} trials that ran diverged")
    return lines


def failure_lines(result: SearchResult) -> list[str]:
    """How many trials failed, then each one and its error's line (best.json's `failed`)."""
    failed = result.best.get("failed") or []
    if not failed:
        return []
    head = (
        f"{len(failed)} of {result.best['trials']} trials failed: told to the sampler as failed (no value), "
        "never re-run by a later run; delete a trial's folder under results/ to run it again"
    )
    each = [
        f"failed: trial {t['number']} (round {t['round']}, experiment {t['experiment']}): {t.get('reason') or 'no reason recorded'}"
        for t in failed
    ]
    return [head, *each]


def rounds_table(result: SearchResult) -> tuple[list[str], list[list[str]]]:
    """The rounds table: one row per round (kind, budget, trials, states, best value)."""
    header = [
        "round",
        "kind",
        "budget",
        "trials",
        "complete",
        "diverged",
        "failed",
        "reused",
        f"best {result.best['metric']}",
    ]
    minimize = result.best["direction"] == "minimize"
    rows = []
    for doc in result.rounds:
        trials = doc["trials"]
        values = [t["value"] for t in trials if t["state"] == "complete"]
        best = (min(values) if minimize else max(values)) if values else None
        budgets = {_budget_text(t.get("budget") or {}) for t in trials}
        rows.append(
            [
                str(doc["round"]),
                doc["kind"],
                ", ".join(sorted(budgets)),
                str(len(trials)),
                *(str(sum(t["state"] == s for t in trials)) for s in ("complete", "diverged", "failed")),
                str(sum(bool(t.get("reused")) for t in trials)),
                format_value("metric", best),
            ]
        )
    return header, rows


def _best_line(result: SearchResult) -> str:
    best = result.best.get("best")
    if not best:
        return "no trial finished"
    return (
        f"best: trial {best['number']} (round {best['round']}, experiment {best['experiment']}), "
        f"{result.best['metric']} {format_value('metric', best['value'])}: {_settings_text(best['settings'])}"
        f" at budget {_budget_text(best.get('budget') or {})}"
    )


def _importance_text(result: SearchResult) -> str | None:
    importances = result.best.get("importances")
    if not importances:
        return None
    return ", ".join(f"{k} {v:.2f}" for k, v in importances.items())


def to_markdown(results: list[SearchResult], plots: dict[str, str]) -> str:
    out = []
    for result in results:
        out += [f"## Search {result.name}", ""]
        tokens = format_value("count", result.best.get("train_tokens"))
        out.append(f"{result.best['trials']} trials in {len(result.rounds)} rounds, {tokens} tokens trained.")
        out += ["", f"- {_best_line(result)}"]
        out += [f"- {line}" for line in failure_lines(result)]
        out += [f"- {line}" for line in boundary_lines(result)]
        if _importance_text(result):
            out.append(f"- importance of the settings (Optuna PED-ANOVA): {_importance_text(result)}")
        header, rows = rounds_table(result)
        out += ["", "| " + " | ".join(header) + " |", "|" + "|".join("--:" for _ in header) + "|"]
        out += ["| " + " | ".join(row) + " |" for row in rows]
        if result.name in plots:
            out += ["", f"![{plots[result.name]}](plots/{plots[result.name]})"]
        out.append("")
    return "\n".join(out)


def to_html(results: list[SearchResult], images: dict[str, str]) -> str:
    """The sections as HTML; `images` maps a search to its plot as a data: URI."""
    esc = html.escape
    out = []
    for result in results:
        header, rows = rounds_table(result)
        items = [_best_line(result), *failure_lines(result), *boundary_lines(result)]
        if _importance_text(result):
            items.append(f"importance of the settings (Optuna PED-ANOVA): {_importance_text(result)}")
        out.append(f"<h2>Search {esc(result.name)}</h2>")
        out.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in items) + "</ul>")
        out.append(
            "<table class=runs><thead><tr>"
            + "".join(f"<th>{esc(h)}</th>" for h in header)
            + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
            + "</tbody></table>"
        )
        if result.name in images:
            out.append(f'<img class=wide src="{images[result.name]}" alt="search {esc(result.name)}">')
    return "\n".join(out)


def plot_search(result: SearchResult, plot_dir: str) -> str:
    """The metric by trial number, one colour per round; diverged (x) and failed (v) trials on the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = result.trials
    values = [t["value"] for t in trials if t["state"] == "complete"]
    floor = min(values) if values else 0.0
    fig, ax = plt.subplots(figsize=(7, 3.6))
    labelled: set[str] = set()
    for doc in result.rounds:
        colour = ROUND_COLOURS[doc["round"] % len(ROUND_COLOURS)]
        done = [t for t in doc["trials"] if t["state"] == "complete"]
        ax.scatter(
            [t["number"] for t in done],
            [t["value"] for t in done],
            color=colour,
            label=f"round {doc['round']} ({doc['kind']})",
        )
        for state, marker in (("diverged", "x"), ("failed", "v")):
            bad = [t for t in doc["trials"] if t["state"] == state]
            if bad:
                label = state if state not in labelled else None  # one legend entry per state
                labelled.add(state)
                ax.scatter([t["number"] for t in bad], [floor] * len(bad), color=BAD, marker=marker, label=label)
    best = result.best.get("best")
    if best:
        ax.axhline(best["value"], color="#868e96", linewidth=0.8, linestyle=":")
    ax.set_xlabel("trial")
    ax.set_ylabel(result.best["metric"])
    ax.set_title(f"search {result.name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    name = f"search_{result.name}.png"
    fig.savefig(os.path.join(plot_dir, name), dpi=100)
    plt.close(fig)
    return name
