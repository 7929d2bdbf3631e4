"""Real snakemake runs of the report: the lr-rank-sweep example's table and plots, `--report`, and the partial report."""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import pytest
import yaml

from helpers import REPO, snakemake

pytestmark = pytest.mark.workflow

SWEEP = REPO / "examples" / "lr-rank-sweep.yaml"
# The example's points that together move every knob it varies (lr; batch and accumulation;
# r, alpha and lr; dropout and epochs; max_length and checkpointing): 5 of its 13 points keep
# every column of the table at less than half the jobs. test_config resolves all 13.
ONE_POINT_PER_KNOB = [0, 4, 7, 10, 12]
FEWER_POINTS = "fewer-points.yaml"  # written into the run's folder by sweep_run
# In smoke mode every max_length is capped to 128, so the 512/768 points no longer differ
# and max_length is rightly not a column; the rest of the sweep's knobs are.
VARIED = [
    "training.learning_rate",
    "training.per_device_train_batch_size",
    "training.gradient_accumulation_steps",
    "training.num_train_epochs",
    "lora.r",
    "lora.lora_alpha",
    "lora.lora_dropout",
    "training.gradient_checkpointing",
]


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("sweep")
    points = yaml.safe_load(SWEEP.read_text())["sweeps"]["lr-rank"]["list"]
    # a second --configfile replaces the sweep's list (Snakemake merges mappings, replaces lists)
    fewer = {"sweeps": {"lr-rank": {"list": [points[i] for i in ONE_POINT_PER_KNOB]}}}
    (workdir / FEWER_POINTS).write_text(yaml.safe_dump(fewer), encoding="utf-8")
    snakemake(workdir, "--cores", "2", *sweep_args(workdir))
    return workdir


def sweep_args(workdir: Path) -> tuple[str, ...]:
    return ("--configfile", str(SWEEP), str(workdir / FEWER_POINTS), "--config", "smoke=true")


def test_sweep_table_has_one_row_per_experiment_the_varied_columns_and_the_diverged_run(sweep_run: Path):
    report = sweep_run / "results" / "report"
    with (report / "summary.csv").open() as handle:
        reader = csv.DictReader(handle)
        columns, rows = reader.fieldnames, list(reader)
    names = [r["experiment"] for r in rows]
    points = len(ONE_POINT_PER_KNOB)
    assert sorted(names) == sorted([f"lr-rank-{i}" for i in range(1, points + 1)] + ["diverge-lr1e20", "baseline"])
    assert columns[columns.index("stages") + 1 : columns.index("trainable_params")] == VARIED
    status = {r["experiment"]: r["status"] for r in rows}
    assert status.pop("diverge-lr1e20") == "diverged" and set(status.values()) == {"ok"}
    diverged = next(r for r in rows if r["experiment"] == "diverge-lr1e20")
    assert "non-finite loss" in diverged["note"] and diverged["best"] == ""
    best = [r for r in rows if r["best"] == "*"]
    assert len(best) == 1 and best[0]["experiment"] != "baseline" and best[0]["rank"] == "1"
    assert names[0] == best[0]["experiment"] and names[-1] == "diverge-lr1e20"  # ranked, unfinished runs last
    assert float(best[0]["eval_loss"]) <= min(float(r["eval_loss"]) for r in rows if r["status"] == "ok")
    assert all(
        r["delta_json_field_accuracy"] != "" for r in rows if r["status"] == "ok" and r["experiment"] != "baseline"
    )

    markdown = (report / "report.md").read_text()
    assert "| lr | batch | accum | epochs | r | alpha | dropout | grad_ckpt |" in markdown
    assert "diverge-lr1e20**: diverged" in markdown
    html = (report / "report.html").read_text()
    assert html.count("<tr class=") == len(rows) and '<tr class="diverged">' in html and '<tr class="best">' in html
    for plot in ("train_loss.png", "eval_loss.png", "json_field_accuracy.png", "sweep_json_field_accuracy.png"):
        assert (report / "plots" / plot).stat().st_size > 10_000, plot
        assert f'alt="{plot}"' in html  # embedded in the page


def test_snakemake_report_packs_the_table_and_plots(sweep_run: Path):
    snakemake(sweep_run, "--cores", "1", *sweep_args(sweep_run), "--report", "report.zip")
    with zipfile.ZipFile(sweep_run / "report.zip") as archive:
        names = archive.namelist()
    # report/report.html is Snakemake's page; the tagged outputs sit under report/data/raw/
    assert "report/report.html" in names
    for output in ("/summary.csv", "/report.html", "/train_loss.png", "/sweep_json_field_accuracy.png"):
        assert any(n.endswith(output) and "/raw/" in n for n in names), output


def test_failed_jobs_leave_a_partial_report_beside_the_finished_rows(tmp_path: Path):
    config = REPO / "tests" / "configs" / "partial-report.yaml"
    proc = snakemake(
        tmp_path, "--cores", "2", "--configfile", str(config), "--config", "smoke=true", "--keep-going", check=False
    )
    assert proc.returncode != 0
    partial = tmp_path / "results" / "report" / "partial"
    rows = {r["experiment"]: r for r in csv.DictReader((partial / "summary.csv").open())}
    assert set(rows) == {"trains", "wrong-target", "baseline"}
    assert rows["trains"]["status"] == "ok" and rows["baseline"]["status"] == "ok"
    failed = rows["wrong-target"]
    assert failed["status"] == "failed" and failed["note"].startswith("train: ")
    assert "no_such_proj" in failed["note"], failed["note"]
    assert failed["log"] == "logs/wrong-target/train/train.log"
    assert (tmp_path / failed["log"]).exists()
    assert "(partial: some jobs failed)" in (partial / "report.html").read_text()
    assert not (tmp_path / "results" / "report" / "summary.csv").exists(), "the full report waits for every job"
