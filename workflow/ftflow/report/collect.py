"""Collecting runs: what each experiment left under results/ and logs/, and why it stopped if it did.

Every file is found through ftflow.paths.Layout, the same names the rules and
the jobs use, and each experiment's config.json is read back as the typed
ExperimentSpec every job reads. Outputs count only when they were written for
this config: a failed job leaves an earlier config's outputs downstream of it
in place, and their provenance hash tells them apart.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from ..atomic import read_json
from ..container import describe
from ..paths import Layout
from ..specs import ExperimentSpec

ERROR_LINE = re.compile(r"^(?:ftflow: error: |[A-Za-z_.]*(?:Error|Exception|Interrupt): )(.+)$")
ERROR_CHARS = 300  # a note quotes at most this much of an error line


@dataclass(frozen=True)
class Problem:
    """Where a run stopped and why: a job step (`train`, `warm/merge`, `tokenize`), the error, the failed job's log."""

    where: str | None
    error: str | None = None
    log: str | None = None


@dataclass
class Run:
    """One experiment as found on disk."""

    name: str
    spec: ExperimentSpec
    # train_metrics.json of each stage, in stage order; None where missing, unreadable or stale
    train_metrics: list[dict | None]
    eval_metrics: dict | None  # eval/metrics.json, None where missing, unreadable or stale
    status: str = "ok"  # ok | diverged | failed | not run
    problem: Problem | None = None
    # stats.json warnings of the data it trained and was scored on: splits that lost over 5% of their rows
    data_warnings: list[dict] = field(default_factory=list)
    benchmarks: Any = None  # lm-evaluation-harness results (report.benchmarks.Benchmarks), when eval.harness has tasks
    # the job log to open first: the failed job's, else the training log (progress lines) of the stage
    # that stopped or of the last stage, else the evaluation's; None when no job has run
    log: str | None = None

    @property
    def finished_stages(self) -> list[dict]:
        return [metrics for metrics in self.train_metrics if metrics]


def read_fresh(path: str, config_hash: str) -> dict | None:
    """The JSON at `path`, or None when missing, unreadable or written for another config."""
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    recorded = (data.get("provenance") or {}).get("config_hash")
    return data if recorded in (None, config_hash) else None


def first_error(log_path: str) -> str | None:
    """The line of a failed job's log that says what went wrong."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as handle:
            lines = [line.strip() for line in handle.read().splitlines() if line.strip()]
    except OSError:
        return None
    for line in lines:
        if line.startswith("ftflow: error:"):
            return line[len("ftflow: error:") :].strip()[:ERROR_CHARS]
    for line in reversed(lines):  # the last line of a traceback names the exception
        if ERROR_LINE.match(line):
            return line[:ERROR_CHARS]
    return lines[-1][:ERROR_CHARS] if lines else None


def job_chain(layout: Layout, spec: ExperimentSpec) -> list[tuple[str, str, str]]:
    """(step, output, log) of every job an experiment's evaluation needs, in run order, as the rules name them."""
    model = Layout.model_name(spec.model, spec.smoke)
    chain = [("prepare_model", layout.model_dir(model), layout.model_log(model))]
    data_ids = dict.fromkeys([data_id for stage in spec.stages for data_id in stage.data_ids] + [spec.eval.data_id])
    chain += [("tokenize", layout.data_dir(data_id), layout.data_log(data_id)) for data_id in data_ids]
    stages = spec.stages
    for i, stage in enumerate(stages):
        step = "" if len(stages) == 1 else f"{stage.name}/"  # a single stage needs no name in the note
        chain.append(
            (
                f"{step}train",
                layout.train_metrics(spec.name, stage.name),
                layout.stage_log(spec.name, stage.name, "train"),
            )
        )
        # the next stage starts from this one's adapter, or from its merged weights
        if i == len(stages) - 1 or stages[i + 1].init_from == "merged":
            chain.append(
                (
                    f"{step}merge",
                    layout.merged_dir(spec.name, stage.name),
                    layout.stage_log(spec.name, stage.name, "merge"),
                )
            )
    chain.append(("evaluate", layout.eval_metrics(spec.name), layout.eval_log(spec.name)))
    return chain


def find_failure(layout: Layout, spec: ExperimentSpec, config_mtime: float) -> tuple[str, Problem]:
    """The first job of the chain without its output: failed if it left a log for this config, else not run.

    A log older than config.json belongs to an earlier config's run, so it
    neither marks this one failed nor lends it its error.
    """
    for step, output, log in job_chain(layout, spec):
        if os.path.exists(output):
            continue
        if os.path.exists(log) and os.path.getmtime(log) >= config_mtime:
            return "failed", Problem(step, first_error(log), log)
        return "not run", Problem(step)
    return "failed", Problem("evaluate", "eval/metrics.json is unreadable")


def read_run(layout: Layout, name: str) -> Run | None:
    """One experiment's run, or None when it has no readable config.json (not planned, or cleaned away)."""
    config_path = layout.experiment_config(name)
    try:
        spec = ExperimentSpec.read(config_path)
    except (OSError, ValueError):
        return None
    digest = spec.config_hash
    run = Run(
        name=name,
        spec=spec,
        train_metrics=[read_fresh(layout.train_metrics(name, stage.name), digest) for stage in spec.stages],
        eval_metrics=read_fresh(layout.eval_metrics(name), digest),
    )
    run.data_warnings = data_warnings(layout, spec)
    stopped = next((metrics for metrics in run.train_metrics if metrics and metrics["status"] != "ok"), None)
    if stopped is not None:
        where = "train" if len(spec.stages) == 1 else f"{stopped['stage']}/train"
        run.status, run.problem = stopped["status"], Problem(where, stopped.get("reason"))
    elif run.eval_metrics is None:
        run.status, run.problem = find_failure(layout, spec, os.path.getmtime(config_path))
    elif run.eval_metrics["status"] != "ok":
        run.status, run.problem = run.eval_metrics["status"], Problem("evaluate", run.eval_metrics.get("reason"))
    run.log = run.problem.log if run.problem and run.problem.log else first_log(layout, spec, stopped)
    return run


def first_log(layout: Layout, spec: ExperimentSpec, stopped: dict | None) -> str | None:
    """The training log of the stage that stopped, else of the last stage that has one, else the evaluation's."""
    stages = [stopped["stage"]] if stopped else [stage.name for stage in reversed(spec.stages)]
    candidates = [layout.stage_log(spec.name, stage, "train") for stage in stages] + [layout.eval_log(spec.name)]
    return next((path for path in candidates if os.path.exists(path)), None)


def data_warnings(layout: Layout, spec: ExperimentSpec) -> list[dict]:
    """The warnings tokenization wrote for the experiment's data, training and eval, each with its dataset."""
    warnings = []
    data = {data_id: name for stage in spec.stages for data_id, name in zip(stage.data_ids, stage.datasets)}
    data[spec.eval.data_id] = spec.eval.dataset
    for data_id, dataset in data.items():
        try:
            found = read_json(layout.data_stats(data_id)).get("warnings") or []
        except (OSError, ValueError):  # not tokenized yet: the status says so
            continue
        warnings += [{"dataset": dataset, **warning} for warning in found]
    return warnings


def collect_runs(layout: Layout, experiments: list[str]) -> list[Run]:
    """The runs of `experiments` that have a config.json, in the order given."""
    return [run for run in (read_run(layout, name) for name in experiments) if run is not None]


def where_line(runs: list[Run]) -> str:
    """Where the runs' training and evaluation ran, from their provenance: one place, or the mix of them.

    A table built from runs on the host and in an image (or in two images) says
    so, naming which run ran where, since library versions may differ between them.
    """
    places: dict[str, list[str]] = {}
    for run in runs:
        recorded = [metrics for metrics in [*run.train_metrics, run.eval_metrics] if metrics]
        for metrics in recorded:
            place = describe((metrics.get("provenance") or {}).get("runtime"))
            names = places.setdefault(place, [])
            if run.name not in names:
                names.append(run.name)
    if not places:
        return "Where: no run has recorded where it ran yet."
    if len(places) == 1:
        return f"Where: every run ran {next(iter(places))}."
    parts = [f"{', '.join(names)} {place}" for place, names in places.items()]
    return "Where: the runs ran in different places, compare with care: " + "; ".join(parts) + "."
