"""Every output path of a run, in one place.

The rules build their input and output patterns from a `Layout` with wildcard
placeholders (`layout.train_metrics("{experiment}", "{stage}")`), the planner
writes spec files to the same names, and the jobs and the report find each
other's outputs through it, so the results layout (README, "Output contract")
is written down once.

Standard library only: the planner and every job import it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

SMOKE_SUFFIX = ".smoke"  # smoke-mode stand-ins of a model live beside the real one, never in its place


@dataclass(frozen=True)
class Layout:
    """Where outputs go under `results`, logs under `logs`, benchmark files under `benchmarks`."""

    results: str = "results"
    logs: str = "logs"
    benchmarks: str = "benchmarks"

    # ------------------------------------------------------------------ models and data

    @staticmethod
    def model_name(model: str, smoke: bool) -> str:
        """The folder name of a prepared model: the config's name, marked in smoke mode."""
        return model + SMOKE_SUFFIX if smoke else model

    def model_dir(self, model_name: str) -> str:
        """results/models/{model}/: a prepared base model (`model_name` as from `model_name()`)."""
        return f"{self.results}/models/{model_name}"

    def model_spec(self, model_name: str) -> str:
        return f"{self.model_dir(model_name)}.json"

    def data_dir(self, data_id: str) -> str:
        """results/data/{data_id}/: a tokenized dataset, shared by every experiment with the same data_id."""
        return f"{self.results}/data/{data_id}"

    def data_spec(self, data_id: str) -> str:
        return f"{self.data_dir(data_id)}.json"

    def data_stats(self, data_id: str) -> str:
        """Rows kept and dropped per split, and the warnings of splits that lost many (the report reads them)."""
        return f"{self.data_dir(data_id)}/stats.json"

    def file_hashes(self) -> str:
        """The planner's cache of data-file SHA-256s."""
        return f"{self.results}/data/.file-hashes.json"

    # ------------------------------------------------------------------ experiments and stages

    def experiment_dir(self, experiment: str) -> str:
        return f"{self.results}/{experiment}"

    def experiment_config(self, experiment: str) -> str:
        """results/{experiment}/config.json: the resolved config, rewritten only when it changes."""
        return f"{self.experiment_dir(experiment)}/config.json"

    def stage_dir(self, experiment: str, stage: str) -> str:
        return f"{self.experiment_dir(experiment)}/{stage}"

    def train_metrics(self, experiment: str, stage: str) -> str:
        """Written last by the train job: its presence marks the stage done."""
        return f"{self.stage_dir(experiment, stage)}/train_metrics.json"

    def artifact_dir(self, experiment: str, stage: str, artifact: str) -> str:
        """{stage}/adapter/ or {stage}/model/: what training produced (methods.Method.artifact)."""
        return f"{self.stage_dir(experiment, stage)}/{artifact}"

    def adapter_dir(self, experiment: str, stage: str) -> str:
        return self.artifact_dir(experiment, stage, "adapter")

    def tensorboard_dir(self, experiment: str, stage: str) -> str:
        return f"{self.stage_dir(experiment, stage)}/tb"

    def merged_dir(self, experiment: str, stage: str) -> str:
        return f"{self.stage_dir(experiment, stage)}/merged"

    def eval_dir(self, experiment: str) -> str:
        return f"{self.experiment_dir(experiment)}/eval"

    def eval_metrics(self, experiment: str) -> str:
        return f"{self.eval_dir(experiment)}/metrics.json"

    def predictions(self, experiment: str) -> str:
        return f"{self.eval_dir(experiment)}/predictions.jsonl"

    def harness_config(self, experiment: str) -> str:
        """results/{experiment}/harness-config.json: the benchmarks to run (eval.harness), apart from config.json."""
        return f"{self.experiment_dir(experiment)}/harness-config.json"

    def harness_results(self, experiment: str, stage: str | None = None) -> str:
        """eval/harness.json: lm-evaluation-harness results of the final model; with a stage,
        eval/harness-after-{stage}.json: of the merged model after that earlier stage."""
        name = "harness.json" if stage is None else f"harness-after-{stage}.json"
        return f"{self.eval_dir(experiment)}/{name}"

    # ------------------------------------------------------------------ report

    def report_dir(self) -> str:
        return f"{self.results}/report"

    def report_table(self) -> str:
        """summary.csv: one row per experiment; the workflow's final target."""
        return f"{self.report_dir()}/summary.csv"

    def report_html(self) -> str:
        return f"{self.report_dir()}/report.html"

    def report_markdown(self) -> str:
        return f"{self.report_dir()}/report.md"

    def report_plots(self) -> str:
        return f"{self.report_dir()}/plots"

    def partial_report_dir(self) -> str:
        """The report written by the onerror handler when jobs failed."""
        return f"{self.report_dir()}/partial"

    def experiments_file(self) -> str:
        """The experiment names the report covers (rewritten only when they change)."""
        return f"{self.report_dir()}/experiments.json"

    # ------------------------------------------------------------------ searches

    def search_dir(self, search: str) -> str:
        return f"{self.results}/search/{search}"

    def search_round_spec(self, search: str, k) -> str:
        """round-{k}.spec.json: what planning round k reads (written by the planner when it changes)."""
        return f"{self.search_dir(search)}/round-{k}.spec.json"

    def search_round_trials(self, search: str, k) -> str:
        """round-{k}.trials.json: the trials the round's planning job chose (a Snakemake checkpoint)."""
        return f"{self.search_dir(search)}/round-{k}.trials.json"

    def search_round(self, search: str, k) -> str:
        """round-{k}.json: the round's trials with their state and value, once all of them ran."""
        return f"{self.search_dir(search)}/round-{k}.json"

    def search_best(self, search: str) -> str:
        return f"{self.search_dir(search)}/best.json"

    def search_study(self, search: str) -> str:
        """The search's Optuna study (SQLite storage), rebuilt from the round files."""
        return f"{self.search_dir(search)}/study.db"

    def search_log(self, search: str, step: str) -> str:
        """logs/search/{search}/{step}.log: round-{k}-plan, round-{k}-tell, best."""
        return f"{self.logs}/search/{search}/{step}.log"

    # ------------------------------------------------------------------ logs and benchmarks

    def model_log(self, model_name: str) -> str:
        return f"{self.logs}/models/{model_name}.log"

    def data_log(self, data_id: str) -> str:
        return f"{self.logs}/data/{data_id}.log"

    def stage_log(self, experiment: str, stage: str, step: str) -> str:
        """logs/{experiment}/{stage}/{train|merge}.log"""
        return f"{self.logs}/{experiment}/{stage}/{step}.log"

    def eval_log(self, experiment: str) -> str:
        return f"{self.logs}/{experiment}/eval.log"

    def harness_log(self, experiment: str, stage: str | None = None) -> str:
        """logs/{experiment}/harness.log, or harness-after-{stage}.log."""
        name = "harness.log" if stage is None else f"harness-after-{stage}.log"
        return f"{self.logs}/{experiment}/{name}"

    def report_log(self) -> str:
        return f"{self.logs}/report.log"

    def partial_report_log(self) -> str:
        return f"{self.logs}/report-partial.log"

    def stage_benchmark(self, experiment: str, stage: str, step: str) -> str:
        return f"{self.benchmarks}/{experiment}/{stage}/{step}.tsv"

    def eval_benchmark(self, experiment: str) -> str:
        return f"{self.benchmarks}/{experiment}/eval.tsv"

    def harness_benchmark(self, experiment: str, stage: str | None = None) -> str:
        name = "harness.tsv" if stage is None else f"harness-after-{stage}.tsv"
        return f"{self.benchmarks}/{experiment}/{name}"


def stage_dir_of(path_in_stage: str) -> str:
    """The stage folder of an entry directly in it: its train_metrics.json (all the merge job is
    handed) or its adapter/ (what a stage that continues an adapter is handed)."""
    return os.path.dirname(os.path.normpath(path_in_stage))
