"""The report table on hand-made results: varied columns, best row, ties, baseline, diverged/failed/not-run rows."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import pytest

from ftflow.hashing import content_hash
from ftflow.paths import Layout
from ftflow.report import write_report
from ftflow.report.collect import collect_runs
from ftflow.report.formatting import format_value
from ftflow.report.table import build_table, headline
from ftflow.specs import FORMAT_VERSION, ExperimentSpec

TRAINING = {"learning_rate": 5e-4, "per_device_train_batch_size": 2, "num_train_epochs": 3, "seed": 42}
LORA = {"r": 16, "lora_alpha": 64, "lora_dropout": 0.05, "target_modules": "all-linear"}


def experiment_config(
    name: str, baseline: bool = False, primary: str = "json_field_accuracy", training=None, lora=None
) -> dict:
    stage = {
        "name": "train",
        "index": 0,
        "method": "lora",
        "datasets": ["colmap"],
        "data_ids": ["colmap-1"],
        "mix": {},
        "init_from": "merged",
        "max_length": 128,
        "packing": True,
        "lora": {**LORA, **(lora or {})},
        "adalora": {},
        "quantization": {},
        "training": {**TRAINING, **(training or {})},
        "divergence": {"factor": 10.0, "warmup_steps": 1},
        "gpus": None,
    }
    evaluation = {
        "dataset": "colmap",
        "data_id": "colmap-1",
        "split": "test",
        "loss_split": "validation",
        "max_new_tokens": 16,
        "batch_size": 16,
        "do_sample": False,
        "temperature": 1.0,
        "top_p": 1.0,
        "max_examples": None,
        "metrics": ["exact_match", "json_field_accuracy"],
        "primary_metric": primary,
    }
    config = {
        "name": name,
        "model": "smol",
        "stages": [] if baseline else [stage],
        "eval": evaluation,
        "baseline": baseline,
        "smoke": True,
    }
    return ExperimentSpec.from_json({**config, "format_version": FORMAT_VERSION}).to_json()  # as the planner writes it


class Results:
    """A results/ and logs/ tree written the way the workflow's jobs write them."""

    def __init__(self, root: Path, tokenized: bool = True):
        self.results, self.logs = root / "results", root / "logs"
        self.names: list[str] = []
        (self.results / "models" / "smol.smoke").mkdir(parents=True)  # prepare_model's output
        if tokenized:
            (self.results / "data" / "colmap-1").mkdir(parents=True)  # tokenize's output

    def _write(self, path: Path, data: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))

    def add(
        self, config: dict, *, train: str | None = "ok", evaluation: dict | None = None, reason: str | None = None
    ) -> dict:
        name = config["name"]
        self.names.append(name)
        self._write(self.results / name / "config.json", config)
        stamp = {"provenance": {"config_hash": content_hash(config)}}
        for stage in config["stages"]:
            if train is not None:
                metrics = {
                    "experiment": name,
                    "stage": stage["name"],
                    "method": "lora",
                    "status": train,
                    "steps": 12,
                    "tokens": 4000,
                    "wall_seconds": 80.0,
                    "trainable_parameters": 4_884_480,
                    "peak_rss_mb": 3905.0,
                    "final_loss": 0.25,
                    "losses": [{"step": s, "loss": 2.0 / s} for s in range(1, 13)],
                    "eval_losses": [],
                    **stamp,
                }
                if reason:
                    metrics["reason"] = reason
                self._write(self.results / name / stage["name"] / "train_metrics.json", metrics)
                (self.results / name / stage["name"] / "merged").mkdir(parents=True, exist_ok=True)
        if evaluation is not None:
            status = "ok" if train in ("ok", None) else train
            self._write(self.results / name / "eval" / "metrics.json", {"status": status, **evaluation, **stamp})
        return config

    def log(self, relative: str, text: str) -> str:
        path = self.logs / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return str(path)

    def table(self):
        return build_table(collect_runs(Layout(str(self.results), str(self.logs)), self.names))


def scores(accuracy: float, loss: float, exact: float = 0.0) -> dict:
    return {
        "eval_loss": loss,
        "perplexity": 2.718281828**loss,
        "metrics": {
            "exact_match": exact,
            "json_field_accuracy": accuracy,
            "invalid_json": 1,
            "invalid_json_rate": 0.1,
            "per_field": {"a": accuracy},
        },
    }


def by_name(table) -> dict:
    return {line["experiment"]: line for line in table.rows}


@pytest.fixture
def sweep(tmp_path) -> Results:
    """Three tuned runs varying lr and r/alpha, and the untuned baseline."""
    results = Results(tmp_path)
    results.add(experiment_config("lr-low", training={"learning_rate": 5e-5}), evaluation=scores(0.40, 0.50))
    results.add(experiment_config("lr-high", training={"learning_rate": 1.5e-3}), evaluation=scores(0.64, 0.30))
    results.add(experiment_config("rank-64", lora={"r": 64, "lora_alpha": 256}), evaluation=scores(0.55, 0.20))
    results.add(experiment_config("baseline", baseline=True), train=None, evaluation=scores(0.10, 1.50))
    return results


def test_only_the_varied_settings_become_columns_with_short_names(sweep):
    table = sweep.table()
    settings = [(key, label) for key, label, kind, _ in table.columns if kind == "setting"]
    assert settings == [("training.learning_rate", "lr"), ("lora.r", "r"), ("lora.lora_alpha", "alpha")]
    assert table.shared["lora.lora_dropout"] == 0.05 and table.shared["training.per_device_train_batch_size"] == 2
    line = by_name(table)["lr-low"]
    assert format_value("setting", line["training.learning_rate"]) == "5e-5"
    assert line["stages"] == "lora" and by_name(table)["baseline"]["stages"] == "untuned"


def test_best_row_rank_order_and_delta_against_the_baseline(sweep):
    table = sweep.table()
    assert [line["experiment"] for line in table.rows] == ["lr-high", "rank-64", "lr-low", "baseline"]
    lines = by_name(table)
    assert [lines[n]["best"] for n in ("lr-high", "rank-64", "lr-low", "baseline")] == ["*", "", "", ""]
    assert [lines[n]["rank"] for n in ("lr-high", "rank-64", "lr-low", "baseline")] == [1, 2, 3, None]
    assert lines["lr-high"]["delta_json_field_accuracy"] == pytest.approx(0.54)
    assert lines["baseline"]["delta_json_field_accuracy"] is None
    assert lines["lr-high"]["tokens_per_s"] == pytest.approx(50.0)
    text = headline(table.groups[0], table)
    assert "best lr-high at 0.640 (+0.540 against the untuned baseline's 0.100)" in text
    assert "lr 1.5e-3, r 16, alpha 64" in text


def test_a_baseline_that_wins_is_ranked_but_never_marked_best(tmp_path):
    results = Results(tmp_path)
    results.add(experiment_config("a", training={"learning_rate": 1e-4}), evaluation=scores(0.30, 0.9))
    results.add(experiment_config("b", training={"learning_rate": 2e-4}), evaluation=scores(0.50, 0.8))
    results.add(experiment_config("baseline", baseline=True), train=None, evaluation=scores(0.50, 0.7))
    table = results.table()
    # the baseline ties b on the primary metric and has the lower eval loss, yet b is best and listed first among the tied
    assert [(line["experiment"], line["best"]) for line in table.rows] == [("baseline", ""), ("b", "*"), ("a", "")]
    table2 = Results(tmp_path / "2")
    table2.add(experiment_config("a", training={"learning_rate": 1e-4}), evaluation=scores(0.30, 0.9))
    table2.add(experiment_config("b", training={"learning_rate": 2e-4}), evaluation=scores(0.20, 0.8))
    table2.add(experiment_config("baseline", baseline=True), train=None, evaluation=scores(0.60, 0.7))
    built = table2.table()
    assert by_name(built)["a"]["best"] == "*"
    assert "no tuned run beats the untuned baseline" in headline(built.groups[0], built)


def test_all_zero_primary_metric_falls_back_to_eval_loss(tmp_path):
    results = Results(tmp_path)
    for name, loss in (("a", 10.81), ("b", 10.72), ("c", 10.79)):
        results.add(experiment_config(name, training={"learning_rate": loss / 1e4}), evaluation=scores(0.0, loss))
    results.add(experiment_config("baseline", baseline=True), train=None, evaluation=scores(0.0, 10.84))
    table = results.table()
    assert [line["experiment"] for line in table.rows] == ["b", "c", "a", "baseline"]
    assert by_name(table)["b"]["best"] == "*"
    assert (
        "every finished run scores 0.000, so eval loss decides: best b at eval loss 10.72 (untuned baseline 10.84)"
        in headline(table.groups[0], table)
    )


def test_exact_ties_share_the_mark_and_a_tie_of_all_marks_none(tmp_path):
    results = Results(tmp_path)
    results.add(experiment_config("a", training={"learning_rate": 1e-4}), evaluation=scores(0.5, 0.4))
    results.add(experiment_config("b", training={"learning_rate": 2e-4}), evaluation=scores(0.5, 0.4))
    results.add(experiment_config("c", training={"learning_rate": 3e-4}), evaluation=scores(0.3, 0.4))
    table = results.table()
    assert {n: (row["best"], row["rank"]) for n, row in by_name(table).items()} == {
        "a": ("*", 1),
        "b": ("*", 1),
        "c": ("", 3),
    }

    everyone = Results(tmp_path / "all")
    everyone.add(experiment_config("a", training={"learning_rate": 1e-4}), evaluation=scores(0.0, 0.4))
    everyone.add(experiment_config("b", training={"learning_rate": 2e-4}), evaluation=scores(0.0, 0.4))
    table = everyone.table()
    assert not any(line["best"] for line in table.rows)
    assert "no best row" in headline(table.groups[0], table)


def test_lower_is_better_primary_metric(tmp_path):
    results = Results(tmp_path)
    results.add(
        experiment_config("a", primary="eval_loss", training={"learning_rate": 1e-4}), evaluation=scores(0.9, 0.6)
    )
    results.add(
        experiment_config("b", primary="eval_loss", training={"learning_rate": 2e-4}), evaluation=scores(0.1, 0.4)
    )
    results.add(
        experiment_config("baseline", baseline=True, primary="eval_loss"), train=None, evaluation=scores(0.0, 1.0)
    )
    table = results.table()
    assert by_name(table)["b"]["best"] == "*"
    assert by_name(table)["b"]["delta_eval_loss"] == pytest.approx(-0.6)


def test_diverged_failed_not_run_and_stale_rows(sweep):
    config = sweep.add(
        experiment_config("diverge", training={"learning_rate": 1e20}),
        train="diverged",
        reason="non-finite loss at step 3",
        evaluation={"reason": "upstream"},
    )
    sweep.add(experiment_config("bad-target", lora={"target_modules": ["nope"]}), train=None)
    log = sweep.log(
        "bad-target/train/train.log",
        "INFO loading\nTraceback (most recent call last):\n  File x\nValueError: Target modules {'nope'} not found in the base model.\n",
    )
    sweep.add(experiment_config("waiting", training={"learning_rate": 7e-4}), train=None)
    # an eval result left from an earlier config of this experiment is not this config's result
    sweep.add(experiment_config("stale", training={"learning_rate": 9e-4}), evaluation=scores(0.99, 0.01))
    stale_eval = sweep.results / "stale" / "eval" / "metrics.json"
    stale_eval.write_text(json.dumps({**json.loads(stale_eval.read_text()), "provenance": {"config_hash": "0" * 16}}))
    os.remove(sweep.results / "stale" / "train" / "train_metrics.json")
    past = time.time() - 3600
    os.utime(
        sweep.log("stale/train/train.log", "INFO done\n"), (past, past)
    )  # older than config.json: an earlier run's log

    lines = by_name(sweep.table())
    assert (lines["diverge"]["status"], lines["diverge"]["note"]) == ("diverged", "train: non-finite loss at step 3")
    assert lines["bad-target"]["status"] == "failed"
    assert lines["bad-target"]["note"] == "train: ValueError: Target modules {'nope'} not found in the base model."
    assert lines["bad-target"]["log"] == log
    assert (lines["waiting"]["status"], lines["waiting"]["note"]) == ("not run", "waits for train")
    assert lines["stale"]["status"] == "not run" and "json_field_accuracy" not in lines["stale"]
    assert all(not lines[n]["best"] for n in ("diverge", "bad-target", "waiting", "stale"))
    assert config["name"] in lines


def test_a_failed_tokenize_job_is_named_for_every_experiment_it_blocks(tmp_path):
    results = Results(tmp_path, tokenized=False)
    results.add(experiment_config("a"), train=None)
    results.add(experiment_config("baseline", baseline=True), train=None)
    results.log("data/colmap-1.log", "ftflow: error: datasets.colmap.source: row 3: missing column 'messages'\n")
    lines = by_name(results.table())
    for name in ("a", "baseline"):
        assert lines[name]["status"] == "failed"
        assert lines[name]["note"] == "tokenize: datasets.colmap.source: row 3: missing column 'messages'"


def test_number_formats():
    assert [format_value("setting", v) for v in (5e-5, 1.5e-3, 0.05, 1e20, 768, True)] == [
        "5e-5",
        "1.5e-3",
        "0.05",
        "1e20",
        "768",
        "on",
    ]
    assert [format_value("count", v) for v in (4_884_480, 38_000, 512)] == ["4.88M", "38k", "512"]
    assert [format_value("seconds", v) for v in (41.24, 206.3, 7300)] == ["41.2s", "3m26s", "2h01m"]
    assert [format_value("mb", v) for v in (642.2, 3905.0)] == ["642 MiB", "3.81 GiB"]
    assert [format_value("delta", v) for v in (0.54, -0.012, 12.5)] == ["+0.540", "-0.012", "+12.5"]
    assert format_value("loss", float("nan")) == "nan" and format_value("metric", None) == ""


def test_write_report_files_and_the_partial_report_is_superseded(sweep, tmp_path):
    out = sweep.results / "report"
    (out / "partial").mkdir(parents=True)
    (out / "partial" / "summary.csv").write_text("stale")
    result = write_report(str(sweep.results), str(sweep.logs), sweep.names, str(out), title="lr sweep")
    assert result["best"] == ["lr-high"]
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["experiment"] for r in rows] == ["lr-high", "rank-64", "lr-low", "baseline"]
    assert {"training.learning_rate", "lora.r", "lora.lora_alpha", "delta_json_field_accuracy"} <= set(rows[0])
    assert rows[0]["training.learning_rate"] == "0.0015" and rows[0]["best"] == "*"
    page = (out / "report.html").read_text()
    assert "<title>lr sweep</title>" in page and 'class="best"' in page and 'alt="train_loss.png"' in page
    assert "| * | 1 | **lr-high** |" in (out / "report.md").read_text()
    for plot in result["plots"]:
        assert (out / "plots" / plot).stat().st_size > 5000, plot
    assert {"train_loss.png", "json_field_accuracy.png", "sweep_json_field_accuracy.png"} <= set(result["plots"])
    assert not (out / "partial").exists()


def test_an_experiment_without_task_metrics_is_reported_not_a_crash(tmp_path):
    results = Results(tmp_path)
    no_numbers = {"eval_loss": None, "perplexity": None, "metrics": {}}  # an `ok` eval that scored no row
    results.add(experiment_config("empty-eval"), evaluation=no_numbers)
    results.add(experiment_config("baseline", baseline=True), train=None, evaluation=no_numbers)
    table = results.table()
    assert headline(table.groups[0], table) == (
        "json_field_accuracy on colmap (higher is better): no finished tuned run reports json_field_accuracy; "
        "see the notes."
    )
    assert by_name(table)["empty-eval"]["note"] == (
        "evaluate: eval/metrics.json has no json_field_accuracy number, so this run is not ranked"
    )
    out = tmp_path / "report"
    result = write_report(str(results.results), str(results.logs), results.names, str(out))
    assert result["best"] == [] and (out / "summary.csv").exists() and (out / "report.html").exists()


def test_data_that_lost_rows_in_tokenization_is_marked_lossy(sweep, tmp_path):
    warning = {
        "split": "train",
        "share": 0.2607,
        "dropped": 13,
        "rows_in": 50,
        "reasons": {"over_length": 12, "missing_column": 1},
        "fix": "raise max_length (now 128) or set truncation: truncate",
        "message": "datasets.colmap: 26% of the train rows dropped (13 of 50: 12 over_length, 1 missing_column); ...",
    }
    (sweep.results / "data" / "colmap-1" / "stats.json").write_text(json.dumps({"warnings": [warning]}))
    table = sweep.table()
    lossy = "colmap train: 26% of rows dropped (over_length, missing_column)"
    assert {row["experiment"]: row["data_loss"] for row in table.rows} == {
        name: lossy for name in ("lr-high", "rank-64", "lr-low", "baseline")
    }
    assert headline(table.groups[0], table).endswith(
        ". Lossy data (over 5% of a split's rows dropped in tokenization): lr-high, rank-64, lr-low, baseline; "
        "see the lossy data column."
    )
    out = tmp_path / "report"
    write_report(str(sweep.results), str(sweep.logs), sweep.names, str(out))
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [row["data_loss"] for row in rows] == [lossy] * 4
    markdown = (out / "report.md").read_text()
    assert "| lossy data | note |" in markdown and f"| {lossy} |" in markdown
    assert "Lossy data" in (out / "report.html").read_text()


def test_no_lossy_data_column_when_no_split_lost_rows(sweep):
    (sweep.results / "data" / "colmap-1" / "stats.json").write_text(json.dumps({"warnings": []}))
    table = sweep.table()
    assert "data_loss" not in [column.key for column in table.columns]
    assert "Lossy" not in headline(table.groups[0], table)
