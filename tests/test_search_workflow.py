"""A three-round search through one real `snakemake` run in smoke mode (tests/configs/search.yaml).

One module fixture runs it once; the tests read what it left: the rounds, the
reuse of equal experiments, the diverging region's boundary, best.json and the
study, the report's section, that nothing is left to do afterwards, and that a
run killed in round 1 finishes on a re-run with the same trials.
"""

from __future__ import annotations

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
    ran = {
        (t["settings"]["lora.r,lora.lora_alpha"][0], t["settings"]["training.learning_rate"]): t
        for t in docs[0]["trials"]
    }
    assert ran[(2, 1.0e-3)]["experiment"] == "sw-1" and ran[(2, 1.0e-3)]["reused"]  # the sweep point
    assert ran[(8, 1.0e-3)]["experiment"] == "a" and ran[(8, 1.0e-3)]["reused"]  # the base itself
    (again,) = docs[2]["trials"]  # the grid is exhausted: an earlier trial asked again, not run again
    (earlier,) = [t for t in docs[0]["trials"] if t["name"] == again["name"]]
    assert again["experiment"] == earlier["experiment"] and again["state"] == earlier["state"]
    # trained: a, sw-1, the two diverging trials and the promoted one; nothing for a reused trial
    diverged = [t["name"] for t in docs[0]["trials"] if t["state"] == "diverged"]
    assert trained(searched) == sorted(["a", "sw-1", *diverged, docs[1]["trials"][0]["name"]])
    assert not (searched / "results" / ran[(2, 1.0e-3)]["name"]).exists()


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
