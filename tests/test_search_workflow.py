"""A three-round search through one real `snakemake` run in smoke mode (tests/configs/search.yaml).

One module fixture runs it once; the tests read what it left: the rounds, the
reuse of equal experiments, the diverging region's boundary, a trial whose
training raised (recorded failed, the search went on), best.json and the study,
the report's section, that nothing is left to do afterwards, and that a run
killed in round 1 finishes on a re-run with the same trials.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from helpers import BIN, REPO, copy_config, snakemake

pytestmark = pytest.mark.workflow

SEARCH = "s"
DIVERGING_LR = 1.0e20
RANK = "lora.r,lora.lora_alpha,lora.target_modules"  # the tied setting; target module "nope" fails


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    work = tmp_path_factory.mktemp("search")
    copy_config(REPO / "tests" / "configs" / "search.yaml", work)
    snakemake(work, "--cores", "2", "--config", "smoke=true", timeout=2400)
    return work


def rounds(work) -> list[dict]:
    return [json.loads((work / f"results/search/{SEARCH}/round-{k}.json").read_text()) for k in range(3)]


def trained(work) -> list[str]:
    return sorted(p.parent.parent.name for p in (work / "results").glob("*/train/train_metrics.json"))


def test_three_rounds_ran_and_promoted_the_best(searched):
    docs = rounds(searched)
    assert [d["kind"] for d in docs] == ["trials", "promote", "trials"]
    assert [len(d["trials"]) for d in docs] == [4, 1, 1]
    assert [t["number"] for d in docs for t in d["trials"]] == list(range(6))
    first = docs[0]["trials"]
    complete = [t for t in first if t["state"] == "complete"]
    assert {t["settings"]["training.learning_rate"] for t in complete} == {1.0e-3}
    (promoted,) = docs[1]["trials"]
    best_screened = min(complete, key=lambda t: t["value"])
    assert promoted["promoted_from"] == best_screened["name"]
    assert promoted["settings"] == best_screened["settings"] and promoted["budget"] == {"max_steps": 3}
    assert promoted["experiment"] == promoted["name"]  # a new budget: a new experiment, trained
    metrics = json.loads((searched / f"results/{promoted['name']}/train/train_metrics.json").read_text())
    assert metrics["steps"] == 3
    best = json.loads((searched / f"results/search/{SEARCH}/best.json").read_text())
    everything = [t for d in docs for t in d["trials"] if t["state"] == "complete"]
    assert best["best"]["value"] == min(t["value"] for t in everything)
    assert (searched / f"results/search/{SEARCH}/study.db").stat().st_size > 0


def test_the_diverging_region_is_told_worst_and_shown_as_the_boundary(searched):
    first = rounds(searched)[0]["trials"]
    diverged = [t for t in first if t["settings"]["training.learning_rate"] == DIVERGING_LR]
    assert len(diverged) == 2 and all(t["state"] == "diverged" and t["value"] is None for t in diverged)
    worst = max(t["value"] for t in first if t["state"] == "complete")
    assert all(t["told"] == worst for t in diverged)  # eval_loss is minimized: the worst is the highest
    best = json.loads((searched / f"results/search/{SEARCH}/best.json").read_text())
    assert best["boundary"][0] == {
        "setting": "training.learning_rate",
        "at_or_above": DIVERGING_LR,
        "diverged": 2,
        "of": 2,
    }
    assert "diverged at training.learning_rate ≥ 1e20 in 2 of 2 trials" in (
        searched / "results/report/report.md"
    ).read_text(encoding="utf-8")


def test_trials_equal_to_experiments_reuse_their_results(searched):
    docs = rounds(searched)
    ran = {(t["settings"][RANK][0], t["settings"]["training.learning_rate"]): t for t in docs[0]["trials"]}
    assert ran[(2, 1.0e-3)]["experiment"] == "sw-1" and ran[(2, 1.0e-3)]["reused"]  # the sweep point
    assert ran[(8, 1.0e-3)]["experiment"] == "a" and ran[(8, 1.0e-3)]["reused"]  # the base itself
    # trained: a, sw-1, the two diverging trials, the promoted one and the failed one; nothing for a reused trial
    diverged = [t["name"] for t in docs[0]["trials"] if t["state"] == "diverged"]
    promoted, failed = docs[1]["trials"][0]["name"], docs[2]["trials"][0]["name"]
    assert trained(searched) == sorted(["a", "sw-1", *diverged, promoted, failed])
    assert not (searched / "results" / ran[(2, 1.0e-3)]["name"]).exists()


def test_a_trial_whose_training_raises_is_recorded_failed_and_the_search_goes_on(searched):
    (failed,) = rounds(searched)[2]["trials"]  # the grid's points left are the two that cannot train
    assert failed["settings"][RANK][2] == ["nope"] and failed["experiment"] == failed["name"]
    assert failed["state"] == "failed" and failed["value"] is None and failed["told"] is None
    assert "Target modules {'nope'} not found" in failed["reason"]
    results = searched / "results" / failed["name"]
    metrics = json.loads((results / "train/train_metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["reason"] == failed["reason"]
    assert not (results / "train/adapter").exists()
    # merge and eval passed the status on: no model was written, none was loaded
    assert [f for f in os.listdir(results / "train/merged") if not f.startswith(".")] == ["ftflow_status.json"]
    assert json.loads((results / "eval/metrics.json").read_text())["status"] == "failed"
    best = json.loads((searched / f"results/search/{SEARCH}/best.json").read_text())
    assert best["states"] == {"complete": 3, "diverged": 2, "failed": 1}
    assert best["failed"] == [dict({key: failed[key] for key in ("number", "name", "experiment", "reason")}, round=2)]
    report = (searched / "results/report/report.md").read_text(encoding="utf-8")
    assert "1 of 6 trials failed" in report and f"failed: trial 5 (round 2, experiment {failed['name']})" in report
    with (searched / "results/report/summary.csv").open(encoding="utf-8") as handle:
        (row,) = [row for row in csv.DictReader(handle) if row["experiment"] == failed["name"]]
    assert row["status"] == "failed" and "Target modules" in row["note"]
    import optuna

    study = optuna.load_study(study_name=SEARCH, storage=f"sqlite:///{searched}/results/search/{SEARCH}/study.db")
    assert [t.state for t in study.trials].count(optuna.trial.TrialState.FAIL) == 1


def test_the_report_has_a_section_per_search(searched):
    report = (searched / "results/report/report.md").read_text(encoding="utf-8")
    assert f"## Search {SEARCH}" in report and "| round | kind | budget |" in report
    assert (searched / f"results/report/plots/search_{SEARCH}.png").exists()
    assert f"Search {SEARCH}</h2>" in (searched / "results/report/report.html").read_text(encoding="utf-8")
    summary = (searched / "results/report/summary.csv").read_text(encoding="utf-8")
    assert rounds(searched)[1]["trials"][0]["name"] in summary  # a trial is a row of the table


def test_a_finished_search_leaves_nothing_to_do(searched):
    out = snakemake(searched, "-n", "--cores", "1", "--config", "smoke=true")
    assert "Nothing to be done" in out.stdout + out.stderr


def test_the_same_config_plans_the_same_trials_in_a_fresh_folder(searched, tmp_path):
    copy_config(REPO / "tests" / "configs" / "search.yaml", tmp_path)
    target = f"results/search/{SEARCH}/round-0.trials.json"
    snakemake(tmp_path, target, "--cores", "1", "--config", "smoke=true")  # the planning job alone
    assert (tmp_path / target).read_text() == (searched / target).read_text()


def test_a_run_killed_in_round_1_finishes_with_the_same_trials(searched, tmp_path):
    """SIGKILL to snakemake and its jobs while round 1's trial trains; the re-run neither loses nor
    duplicates a trial, and trains nothing it had finished."""
    work = tmp_path / "w"
    shutil.copytree(searched, work, symlinks=True)
    promoted = rounds(searched)[1]["trials"][0]["name"]
    shutil.rmtree(work / "results" / promoted)
    shutil.rmtree(work / "results" / "report")
    for name in ("round-1.trials.json", "round-1.json", "round-2.trials.json", "round-2.json", "best.json"):
        (work / f"results/search/{SEARCH}/{name}").unlink()
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(work)]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(
        [*cmd, "--cores", "2", "--config", "smoke=true"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    train_log = work / "logs" / promoted / "train" / "train.log"
    deadline = time.time() + 600
    while not train_log.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert train_log.exists(), "round 1's trial never started"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    snakemake(work, "--unlock", "--cores", "1", "--config", "smoke=true")
    snakemake(work, "--cores", "2", "--rerun-incomplete", "--config", "smoke=true", timeout=1800)
    for k in range(3):
        again = json.loads((work / f"results/search/{SEARCH}/round-{k}.json").read_text())
        before = rounds(searched)[k]
        keys = ("number", "name", "experiment", "settings", "budget", "state")
        assert [{key: t[key] for key in keys} for t in again["trials"]] == [
            {key: t[key] for key in keys} for t in before["trials"]
        ]
    assert trained(work) == trained(searched)
