"""A three-round search through one real `snakemake` run in smoke mode (tests/configs/search.yaml).

One module fixture runs it once; the tests read what it left: the rounds, the
reuse of equal experiments, best.json and the study, the report's section,
and that nothing is left to do afterwards.
"""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import REPO, copy_config, snakemake

pytestmark = pytest.mark.workflow

SEARCH = "s"


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    work = tmp_path_factory.mktemp("search")
    copy_config(REPO / "tests" / "configs" / "search.yaml", work)
    snakemake(work, "--cores", "2", "--config", "smoke=true", timeout=2400)
    return work


def rounds(work) -> list[dict]:
    return [json.loads((work / f"results/search/{SEARCH}/round-{k}.json").read_text()) for k in range(3)]


def test_three_rounds_ran_and_promoted_the_best(searched):
    docs = rounds(searched)
    assert [d["kind"] for d in docs] == ["trials", "promote", "trials"]
    assert [len(d["trials"]) for d in docs] == [2, 1, 1]
    trials = [t for d in docs for t in d["trials"]]
    assert all(t["state"] == "complete" and t["value"] > 0 for t in trials)  # eval_loss of each
    screened = sorted(docs[0]["trials"], key=lambda t: t["value"])
    (promoted,) = docs[1]["trials"]
    assert promoted["promoted_from"] == screened[0]["name"]
    assert promoted["settings"] == screened[0]["settings"] and promoted["budget"] == {"max_steps": 3}
    assert promoted["experiment"] == promoted["name"]  # a new budget: a new experiment, trained
    steps = json.loads((searched / f"results/{promoted['name']}/train/train_metrics.json").read_text())["steps"]
    assert steps == 3
    best = json.loads((searched / f"results/search/{SEARCH}/best.json").read_text())
    assert best["best"]["value"] == min(t["value"] for t in trials)
    assert (searched / f"results/search/{SEARCH}/study.db").stat().st_size > 0


def test_trials_equal_to_experiments_reuse_their_results(searched):
    docs = rounds(searched)
    by_r = {t["settings"]["lora.r,lora.lora_alpha"][0]: t for t in docs[0]["trials"]}
    assert by_r[2]["experiment"] == "sw-1" and by_r[2]["reused"]  # the sweep point
    assert by_r[8]["experiment"] == "a" and by_r[8]["reused"]  # the base itself
    (again,) = docs[2]["trials"]  # the grid is exhausted: an earlier trial asked again
    assert again["name"] in {t["name"] for t in docs[0]["trials"]} and again["reused"]
    # only a, sw-1 and the promoted trial trained; no folder for a reused trial
    trained = sorted(p.parent.parent.name for p in (searched / "results").glob("*/train/train_metrics.json"))
    assert trained == sorted(["a", "sw-1", docs[1]["trials"][0]["name"]])
    assert not any((searched / "results" / t["name"]).exists() for t in docs[0]["trials"])


def test_the_report_has_a_section_per_search(searched):
    report = (searched / "results/report/report.md").read_text()
    assert f"## Search {SEARCH}" in report and "| round | kind | budget |" in report
    assert (searched / f"results/report/plots/search_{SEARCH}.png").exists()
    assert f"Search {SEARCH}</h2>" in (searched / "results/report/report.html").read_text()
    summary = (searched / "results/report/summary.csv").read_text()
    assert rounds(searched)[1]["trials"][0]["name"] in summary  # a trial is a row of the table


def test_a_finished_search_leaves_nothing_to_do(searched):
    out = snakemake(searched, "-n", "--cores", "1", "--config", "smoke=true")
    assert "Nothing to be done" in out.stdout + out.stderr


def test_the_same_config_plans_the_same_trials_in_a_fresh_folder(searched, tmp_path):
    copy_config(REPO / "tests" / "configs" / "search.yaml", tmp_path)
    target = f"results/search/{SEARCH}/round-0.trials.json"
    snakemake(tmp_path, "--cores", "1", "--config", "smoke=true", target)  # the planning job alone
    assert (tmp_path / target).read_text() == (searched / target).read_text()
    shutil.rmtree(tmp_path / "results")
