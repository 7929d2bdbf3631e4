"""Searches without training: the config checks, the planning of rounds (Optuna ask/tell, seeded),
the boundary and best trial of finished rounds, and the planner's cost.

The jobs' functions run for real on results files the tests write; only the
trials' metrics are given instead of trained (tests/test_search_workflow.py
trains them through snakemake)."""

from __future__ import annotations

import copy
import time

import pytest

from ftflow.atomic import read_json, write_json
from ftflow.config import ConfigError, build_plan
from ftflow.paths import Layout
from ftflow.search import finish_search, plan_round, tell_round
from helpers import raw_config

SPACE = {
    "training.learning_rate": {"low": 5.0e-5, "high": 3.0e-3, "log": True},
    "lora.r,lora.lora_alpha": [[8, 32], [16, 64], [32, 128]],
    "lora.lora_dropout": [0.05, 0.1, 0.2],
    "training.num_train_epochs": {"low": 1, "high": 5, "step": 1},
}


def search_config(**search) -> dict:
    raw = copy.deepcopy(raw_config({"base": {}}))
    raw["datasets"]["colmap"]["metrics"] = ["exact_match"]
    raw["searches"] = {
        "lr-rank": {
            "base": "base",
            "space": copy.deepcopy(SPACE),
            "seed": 0,
            "rounds": [{"trials": 6, "training": {"max_steps": 2}}, {"promote": 2}, {"trials": 3}],
            **search,
        }
    }
    return raw


def config_error(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        build_plan(raw, check_schema=True)
    return str(info.value)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"space": {"training.learnin_rate": [1e-4]}}, "searches.lr-rank.space.training.learnin_rate: unknown key"),
        ({"space": {"training.learning_rate": {"low": 1e-3, "high": 1e-4}}}, "empty range: low 0.001 is not below"),
        ({"space": {"training.learning_rate": {"low": 1e-3, "high": 1e-3}}}, "empty range"),
        ({"space": {"training.learning_rate": {"low": 0.0, "high": 1e-3, "log": True}}}, "log range needs low > 0"),
        ({"space": {"lora.r": ["eight"]}}, "searches.lr-rank.space.lora.r: the base experiment 'base' cannot take it"),
        ({"rounds": [{"trials": 2}, {"promote": 3}]}, "rounds[1].promote: promotes 3 trials but the rounds before"),
        ({"rounds": [{"promote": 1}]}, "rounds[0].promote"),
        ({"metric": "rougeL"}, "searches.lr-rank.metric: 'rougeL' is not a number the evaluation of 'base' reports"),
        ({"base": "nope"}, "searches.lr-rank.base: unknown experiment 'nope'"),
        ({"sampler": "grid"}, "the grid sampler needs a step for a float range"),
        ({"space": {"lora.lora_dropout": {"low": 0.0, "high": 0.25, "step": 0.1}}}, "is not a multiple of step 0.1"),
        ({"rounds": [{"trials": 2, "training": {"max_step": 9}}]}, "rounds[0].training.max_step: unknown key"),
    ],
)
def test_bad_search_is_one_config_error(change, expected):
    raw = search_config()
    raw["searches"]["lr-rank"].update(change)
    assert expected in config_error(raw)


def test_a_search_plans_no_job_before_its_rounds(tmp_path):
    plan = build_plan(search_config(), workdir=str(tmp_path), results=str(tmp_path / "results"))
    search = plan.searches["lr-rank"]
    assert search.metric == "exact_match" and search.direction == "maximize"  # the base's primary metric
    assert [d["kind"] for d in search.space] == ["float", "choice", "choice", "int"]
    assert set(plan.experiments) == {"base"}  # trials come with the rounds; probes leave nothing
    assert len(plan.data) == 1
    plan.write_specs()
    assert read_json(plan.layout.search_round_spec("lr-rank", 2))["rounds"][2] == {
        "kind": "trials",
        "n": 3,
        "training": {},
    }
    assert read_json(plan.layout.experiments_file()) == ["base"]


def test_probing_a_space_over_max_length_plans_no_tokenization(tmp_path):
    """The planner resolves the base at each max_length to check it; those resolutions are checks, not
    experiments: no tokenization job until a trial needs one."""
    without = build_plan(search_config(), workdir=str(tmp_path), results=str(tmp_path / "results"))
    raw = search_config(space={**SPACE, "max_length": [48, 96]})
    plan = build_plan(raw, workdir=str(tmp_path), results=str(tmp_path / "results"))
    assert set(plan.data) == set(without.data)
    assert plan.trial_data_pattern()  # a trial at a new max_length may still add one, as its round is planned


def test_editing_a_later_round_keeps_the_earlier_rounds_specs(tmp_path):
    plan = build_plan(search_config(), workdir=str(tmp_path), results=str(tmp_path / "results"))
    plan.write_specs()
    edited = search_config(rounds=[{"trials": 6, "training": {"max_steps": 2}}, {"promote": 2}, {"trials": 5}])
    plan = build_plan(edited, workdir=str(tmp_path), results=str(tmp_path / "results"))
    assert plan.write_specs() == [plan.layout.search_round_spec("lr-rank", 2)]
    changed = search_config(space={**SPACE, "lora.lora_dropout": [0.0, 0.1]})
    plan = build_plan(changed, workdir=str(tmp_path), results=str(tmp_path / "results"))
    assert len(plan.write_specs()) == 3  # a changed space is a new search: every round re-planned


def run_rounds(root, raw, values) -> list[dict]:
    """Plan and tell every round of the search, the trials' metrics given by `values(trial)`:
    a number, "diverged" or "failed"."""
    plan = build_plan(raw, workdir=str(root), results=str(root / "results"))
    plan.write_specs()
    layout = plan.layout
    search = plan.searches["lr-rank"]
    done = []
    for k in range(len(search.rounds)):
        spec = layout.search_round_spec("lr-rank", k)
        trials = plan_round(spec, done, layout.search_round_trials("lr-rank", k))
        experiments = plan.add_round_trials(layout.search_round_trials("lr-rank", k))
        for trial, experiment in zip(trials["trials"], experiments):
            value = values(trial)
            status = value if value in ("diverged", "failed") else "ok"
            # the shape evaluation.py writes: task metrics nested, the split's loss at the top
            metrics = {"status": status, "eval_loss": 2.0}
            if status == "ok":
                metrics.update(metrics={"exact_match": value}, primary_value=value)
            if status == "failed":
                metrics["reason"] = "RuntimeError: out of memory"
            write_json(layout.eval_metrics(experiment), metrics)
        tell_round(
            spec,
            layout.search_round_trials("lr-rank", k),
            experiments,
            str(layout.results),
            done,
            out := layout.search_round("lr-rank", k),
        )
        done.append(out)
    return [read_json(path) for path in done]


def lr_score(trial) -> float | str:
    """A made-up response surface: best near lr 5e-4, diverged from 1.5e-3 up."""
    lr = trial["settings"]["training.learning_rate"]
    if lr >= 1.5e-3:
        return "diverged"
    return round(1.0 - abs(lr - 5e-4) * 1000, 6)


def test_rounds_are_deterministic_and_promote_the_best(tmp_path):
    first = run_rounds(tmp_path / "one", search_config(), lr_score)
    again = run_rounds(tmp_path / "two", search_config(), lr_score)
    names = [[t["name"] for t in doc["trials"]] for doc in first]
    assert names == [[t["name"] for t in doc["trials"]] for doc in again]  # same config, same results: same trials
    assert [len(n) for n in names] == [6, 2, 3]
    assert [t["number"] for doc in first for t in doc["trials"]] == list(range(11))
    assert all(name.startswith("lr-rank-") and len(name) == len("lr-rank-") + 8 for doc in names for name in doc)
    screened = sorted((t for t in first[0]["trials"] if t["state"] == "complete"), key=lambda t: -t["value"])
    promoted = first[1]["trials"]
    assert [t["promoted_from"] for t in promoted] == [t["name"] for t in screened[:2]]
    assert all(t["budget"] == {} and first[0]["trials"][0]["budget"] == {"max_steps": 2} for t in promoted)
    # a diverged trial is told the worst value so far, a finished one its own
    for doc in first:
        values = [t["value"] for d in first[: doc["round"] + 1] for t in d["trials"] if t["state"] == "complete"]
        for trial in doc["trials"]:
            assert trial["told"] == (trial["value"] if trial["state"] == "complete" else min(values))


def test_a_trial_promoted_at_its_own_budget_is_the_same_run(tmp_path):
    first, promoted = run_rounds(tmp_path, search_config(rounds=[{"trials": 3}, {"promote": 1}]), lr_score)
    (trial,) = promoted["trials"]
    assert trial["name"] == trial["promoted_from"] and trial["experiment"] == trial["name"]
    assert trial["reused"] and not any(t["reused"] for t in first["trials"])


def test_a_grid_search_never_asks_again_for_a_point_an_earlier_round_ran(tmp_path):
    grid = [1.0e-4, 2.0e-4, 3.0e-4, 4.0e-4]
    raw = search_config(
        sampler="grid",
        space={"training.learning_rate": grid},
        rounds=[{"trials": 2}, {"promote": 1}, {"trials": 2}],
    )
    first, _, last = run_rounds(tmp_path, raw, lr_score)
    asked = [t["settings"]["training.learning_rate"] for doc in (first, last) for t in doc["trials"]]
    assert sorted(asked) == grid


def test_a_different_seed_or_space_makes_different_trials(tmp_path):
    base = run_rounds(tmp_path / "a", search_config(rounds=[{"trials": 4}]), lr_score)[0]
    seeded = run_rounds(tmp_path / "b", search_config(rounds=[{"trials": 4}], seed=1), lr_score)[0]
    space = copy.deepcopy(SPACE)
    space["lora.lora_dropout"] = [0.0, 0.1]
    respaced = run_rounds(tmp_path / "c", search_config(rounds=[{"trials": 4}], space=space), lr_score)[0]
    names = {tuple(t["name"] for t in doc["trials"]) for doc in (base, seeded, respaced)}
    assert len(names) == 3


def test_best_and_boundary_of_a_finished_search(tmp_path):
    rounds = run_rounds(tmp_path, search_config(sampler="random"), lr_score)
    layout = Layout(str(tmp_path / "results"))
    paths = [layout.search_round("lr-rank", k) for k in range(3)]
    best = finish_search(
        layout.search_round_spec("lr-rank", 2), paths, layout.search_best("lr-rank"), layout.search_study("lr-rank")
    )
    trials = [t for doc in rounds for t in doc["trials"]]
    diverged = [t for t in trials if t["state"] == "diverged"]
    assert diverged, "the seeded random sampler should reach lr >= 1.5e-3"
    finished = [t for t in trials if t["state"] == "complete"]
    assert best["best"]["value"] == max(t["value"] for t in finished)
    lr_boundary = next(b for b in best["boundary"] if b["setting"] == "training.learning_rate")
    assert lr_boundary["at_or_above"] == min(t["settings"]["training.learning_rate"] for t in diverged)
    assert lr_boundary["diverged"] == lr_boundary["of"] == len(diverged)
    assert best["states"]["diverged"] == len(diverged)
    import optuna

    study = optuna.load_study(study_name="lr-rank", storage=f"sqlite:///{layout.search_study('lr-rank')}")
    assert len(study.trials) == len(trials)
    assert study.best_value == best["best"]["value"]


def test_a_failed_trial_is_told_failed_and_counted_out_loud(tmp_path):
    """A trial whose job raised: told to the sampler as FAIL (no value), never promoted, listed in best.json
    with its error line and in the report's section."""
    import optuna

    from ftflow.report.searches import SearchResult, failure_lines

    def score(trial):
        return "failed" if trial["settings"]["lora.r,lora.lora_alpha"] == [32, 128] else lr_score(trial)

    rounds = run_rounds(tmp_path, search_config(sampler="random"), score)
    trials = [dict(t, round=doc["round"]) for doc in rounds for t in doc["trials"]]
    failed = [t for t in trials if t["state"] == "failed"]
    assert failed, "the seeded random sampler should pick r32 at least once"
    assert all(t["told"] is None and t["reason"] == "RuntimeError: out of memory" for t in failed)
    assert not {t["promoted_from"] for t in rounds[1]["trials"]} & {t["name"] for t in failed}
    layout = Layout(str(tmp_path / "results"))
    paths = [layout.search_round("lr-rank", k) for k in range(3)]
    best = finish_search(
        layout.search_round_spec("lr-rank", 2), paths, layout.search_best("lr-rank"), layout.search_study("lr-rank")
    )
    assert best["states"]["failed"] == len(failed)
    assert [t["name"] for t in best["failed"]] == [t["name"] for t in failed]
    study = optuna.load_study(study_name="lr-rank", storage=f"sqlite:///{layout.search_study('lr-rank')}")
    assert [t.state for t in study.trials].count(optuna.trial.TrialState.FAIL) == len(failed)
    lines = failure_lines(SearchResult("lr-rank", best, rounds))
    assert lines[0].startswith(f"{len(failed)} of {len(trials)} trials failed")
    assert lines[1] == (
        f"failed: trial {failed[0]['number']} (round {failed[0]['round']}, experiment {failed[0]['experiment']}): "
        "RuntimeError: out of memory"
    )


def test_planning_a_100_trial_search_costs_about_what_a_100_point_sweep_does(tmp_path):
    search = search_config(rounds=[{"trials": 100}], sampler="random")
    run_rounds(tmp_path / "s", search, lambda trial: 0.5)
    sweep = raw_config({"base": {}})
    sweep["sweeps"] = {"lr": {"base": "base", "grid": {"training.learning_rate": [1e-5 * (i + 1) for i in range(100)]}}}

    def seconds(raw, root) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            plan = build_plan(raw, workdir=str(root), results=str(root / "results"))
            plan.write_specs()
            best = min(best, time.perf_counter() - start)
        return best, plan

    search_seconds, search_plan = seconds(search, tmp_path / "s")
    sweep_seconds, sweep_plan = seconds(sweep, tmp_path / "w")
    assert len(search_plan.experiments) == len(sweep_plan.experiments) == 101
    assert search_seconds < sweep_seconds + 1.0, (search_seconds, sweep_seconds)


def test_a_round_after_only_failed_trials_promotes_none_and_the_search_goes_on(tmp_path):
    """Every screening trial failed: the promote round has no trial, is told through the command line
    with no experiments, and the next round asks the sampler again."""
    from ftflow.cli import main

    raw = search_config(sampler="random")
    plan = build_plan(raw, workdir=str(tmp_path), results=str(tmp_path / "results"))
    plan.write_specs()
    layout = plan.layout
    rounds = []
    for k in range(3):
        spec = layout.search_round_spec("lr-rank", k)
        trials = plan_round(spec, rounds, layout.search_round_trials("lr-rank", k))
        experiments = plan.add_round_trials(layout.search_round_trials("lr-rank", k))
        for experiment in experiments:
            write_json(layout.eval_metrics(experiment), {"status": "failed", "reason": "RuntimeError: boom"})
        args = ["search-tell", "--spec", spec, "--trials", layout.search_round_trials("lr-rank", k)]
        args += ["--experiments", *experiments, "--previous", *rounds, "--out", layout.search_round("lr-rank", k)]
        assert main(args) == 0
        rounds.append(layout.search_round("lr-rank", k))
        assert len(trials["trials"]) == [6, 0, 3][k]
    told = [read_json(path) for path in rounds]
    assert [t["state"] for doc in told for t in doc["trials"]] == ["failed"] * 9


def test_a_search_where_nothing_diverged_says_so():
    from ftflow.report.searches import SearchResult, boundary_lines

    best = {"boundary": [], "states": {"complete": 13, "diverged": 0, "failed": 1}}
    assert boundary_lines(SearchResult("lr-rank", best, [])) == ["no boundary: none of the 13 trials that ran diverged"]
    found = {"boundary": [{"setting": "lr", "at_or_above": 1e-3, "diverged": 2, "of": 2}], "states": {"diverged": 2}}
    assert boundary_lines(SearchResult("lr-rank", found, [])) == ["diverged at lr ≥ 1e-3 in 2 of 2 trials"]
