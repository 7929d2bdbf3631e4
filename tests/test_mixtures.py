"""Mixtures: a stage trains on several datasets, each tokenized once, combined in the train job.

The combining is tested on small in-memory splits (which rows, how often, in
which order for a seed), the train job through helpers.Workspace in this
process on the smoke model (the row counts it trained on, pinned), and the
DAG with one `snakemake -n` (one tokenize job per member).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from types import SimpleNamespace

import pytest

from ftflow.data import load_split
from ftflow.errors import StageError
from ftflow.mixing import mix_train_splits
from ftflow.report.settings import experiment_settings
from ftflow.report.table import stages_text
from ftflow.specs import concat_rows
from ftflow.train import load_training_data
from helpers import COLMAP, Workspace, planned_jobs, raw_config, snakemake

# --------------------------------------------------------------------------- combining splits


def member(tag: int, rows: int, dtype: str = "int32"):
    """A tokenized train split whose row i is [tag, i] (text blocks store int64 ids, chat rows int32)."""
    from datasets import Dataset, Features, Sequence, Value

    ids = [[tag, i] for i in range(rows)]
    features = Features(
        {"input_ids": Sequence(Value(dtype)), "labels": Sequence(Value(dtype)), "length": Value("int64")}
    )
    return Dataset.from_dict({"input_ids": ids, "labels": ids, "length": [2] * rows}, features=features)


def mix(strategy: str, seed: int = 0, **weights: float) -> dict:
    return {"strategy": strategy, "weights": weights, "seed": seed}


def rows_of(dataset) -> list[tuple[int, int]]:
    return [tuple(ids) for ids in dataset["input_ids"]]


def test_concat_takes_the_weighted_rows_of_each_member():
    """a: round(0.3 x 10) = 3 distinct rows; b: 2.5 x 4 = every row twice and 2 of them once more."""
    mixed, record = mix_train_splits(
        [member(0, 10), member(1, 4)], ("a", "b"), ("a-1", "b-1"), mix("concat", a=0.3, b=2.5)
    )
    counts = Counter(rows_of(mixed))
    a_rows = [row for row in counts if row[0] == 0]
    assert len(a_rows) == 3 and all(counts[row] == 1 for row in a_rows)
    assert sorted(counts[(1, i)] for i in range(4)) == [2, 2, 3, 3]
    assert record == {
        "strategy": "concat",
        "seed": 0,
        "rows": 13,
        "members": [
            {"dataset": "a", "data_id": "a-1", "weight": 0.3, "train_rows": 10, "rows_taken": 3},
            {"dataset": "b", "data_id": "b-1", "weight": 2.5, "train_rows": 4, "rows_taken": 10},
        ],
    }
    assert [concat_rows(10, 0.25), concat_rows(10, 0.35), concat_rows(7, 0.0)] == [3, 4, 0]  # half up


def test_interleave_is_seeded_and_stops_when_the_first_member_runs_out():
    members = [member(0, 50), member(1, 20), member(2, 30)]
    weights = mix("interleave", seed=4, a=1.0, b=3.0, c=0.0)
    first, record = mix_train_splits(members, ("a", "b", "c"), ("a-1", "b-1", "c-1"), weights)
    again, _ = mix_train_splits(members, ("a", "b", "c"), ("a-1", "b-1", "c-1"), weights)
    other, _ = mix_train_splits(members, ("a", "b", "c"), ("a-1", "b-1", "c-1"), {**weights, "seed": 5})
    assert rows_of(first) == rows_of(again) != rows_of(other)
    taken = {m["dataset"]: m["rows_taken"] for m in record["members"]}
    # b (probability 3/4) runs out first and gives all its rows; c (weight 0) is never drawn; no row repeats
    assert taken["b"] == 20 and taken["c"] == 0 and 0 < taken["a"] < 20
    assert record["rows"] == len(first) == taken["a"] + 20
    assert len(set(rows_of(first))) == len(first)
    # each member's rows come in a seeded random order, not the first ones of the file
    assert [row for row in rows_of(first) if row[0] == 0] != [(0, i) for i in range(taken["a"])]


def test_text_blocks_mix_with_chat_rows():
    """Text blocks store int64 ids, chat rows int32: the members are cast to one type."""
    mixed, record = mix_train_splits(
        [member(0, 4, "int64"), member(1, 4)], ("corpus", "chat"), ("c-1", "d-1"), mix("concat", corpus=1.0, chat=1.0)
    )
    assert sorted(rows_of(mixed)) == [(0, i) for i in range(4)] + [(1, i) for i in range(4)]
    assert record["rows"] == 8


# --------------------------------------------------------------------------- the train job

GENERAL = {**COLMAP, "args": {"seed": 11, "train": 40, "validation": 6, "test": 6}}
EXPERIMENTS = {
    "task": {},
    "general-only": {"dataset": "general"},
    "concat": {"dataset": ["general", "colmap"], "mix": {"weights": {"general": 0.25, "colmap": 1.5}}},
    "interleave": {
        "stages": [
            {
                "name": "sft",
                "dataset": ["general", "colmap"],
                "mix": {"strategy": "interleave", "weights": {"general": 1, "colmap": 3}, "seed": 1},
            }
        ]
    },
}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    raw = raw_config(EXPERIMENTS, max_steps=2)
    raw["datasets"]["general"] = GENERAL
    return Workspace(tmp_path_factory.mktemp("mixtures"), raw)


def stage_of(ws: Workspace, experiment: str):
    return ws.plan.experiments[experiment].stages[0]


def data_dirs(ws: Workspace, stage) -> list[str]:
    return [str(ws.results / "data" / data_id) for data_id in stage.data_ids]


def test_members_are_tokenized_once_and_shared(ws):
    concat = stage_of(ws, "concat")
    assert concat.data_ids == (stage_of(ws, "general-only").data_id, stage_of(ws, "task").data_id)
    assert sorted(ws.plan.data) == sorted(concat.data_ids)  # two tokenize jobs for four experiments
    assert ws.plan.experiments["interleave"].eval.data_id == ws.plan.experiments["task"].eval.data_id


def test_concat_train_job_trains_on_the_weighted_row_counts(ws):
    """The tokenized members keep 38 of general's 40 train rows and 47 of colmap's 48 (the others are
    over max_length): round(0.25 x 38 = 9.5) = 10 and round(1.5 x 47 = 70.5) = 71, rounded half up."""
    metrics = ws.train("concat")
    assert metrics["status"] == "ok" and metrics["steps"] == 2
    assert metrics["train_examples"] == 81
    mixture = metrics["mixture"]
    assert [(m["dataset"], m["train_rows"], m["rows_taken"]) for m in mixture["members"]] == [
        ("general", 38, 10),
        ("colmap", 47, 71),
    ]
    assert mixture["strategy"] == "concat" and mixture["rows"] == 81
    written = json.loads((ws.stage_dir("concat") / "train_metrics.json").read_text())
    assert written["mixture"] == mixture
    assert ws.train("task")["mixture"] is None


def test_interleave_train_job_is_seeded_and_deterministic(ws):
    stage = stage_of(ws, "interleave")
    first, _, record = load_training_data(data_dirs(ws, stage), stage, "interleave")
    again, _, _ = load_training_data(data_dirs(ws, stage), stage, "interleave")
    assert first["input_ids"] == again["input_ids"]
    taken = {m["dataset"]: m["rows_taken"] for m in record["members"]}
    # pinned for seed 1: colmap (probability 3/4) runs out first, giving its 47 rows; general what was drawn by then
    assert taken == {"general": 12, "colmap": 47} and len(first) == 59
    reseeded = replace(stage, mix={**stage.mix, "seed": 2})
    assert load_training_data(data_dirs(ws, stage), reseeded, "interleave")[0]["input_ids"] != first["input_ids"]
    metrics = ws.train("interleave", "sft")
    assert metrics["status"] == "ok" and metrics["mixture"] == record and metrics["train_examples"] == 59


def test_validation_while_training_is_the_last_members(ws):
    stage = stage_of(ws, "concat")
    evaluating = replace(stage, training={**stage.training, "eval_strategy": "steps"})
    _, validation, _ = load_training_data(data_dirs(ws, stage), evaluating, "concat")
    colmap = load_split(data_dirs(ws, stage)[1], "validation")
    assert len(validation) == len(colmap) == 8  # colmap's, not general's 6 nor both
    assert validation["input_ids"] == colmap["input_ids"]


def test_data_folders_in_the_wrong_order_are_refused(ws):
    stage = stage_of(ws, "concat")
    with pytest.raises(StageError, match="holds tokenized data 'colmap-"):
        load_training_data(list(reversed(data_dirs(ws, stage))), stage, "concat")
    with pytest.raises(StageError, match="got 1 data folders for the 2 datasets"):
        load_training_data(data_dirs(ws, stage)[:1], stage, "concat")


def test_report_names_the_mixture(ws):
    assert stages_text(SimpleNamespace(spec=ws.plan.experiments["concat"])) == "lora[general 0.25 + colmap 1.5]"
    assert stages_text(SimpleNamespace(spec=ws.plan.experiments["task"])) == "lora"
    assert stages_text(SimpleNamespace(spec=ws.plan.experiments["interleave"])) == "lora[general | colmap 3]"
    settings = experiment_settings(ws.plan.experiments["interleave"])
    assert settings["dataset"] == "general + colmap"
    assert (settings["mix.strategy"], settings["mix.weights.general"], settings["mix.seed"]) == ("interleave", 1.0, 1)


def test_report_names_the_mixture_of_a_later_stage(tmp_path):
    from ftflow.config import build_plan

    stages = [{"name": "pt"}, {"name": "sft", "dataset": ["general", "colmap"], "mix": {"weights": {"general": 0.2}}}]
    raw = raw_config({"curriculum": {"stages": stages}})
    raw["datasets"]["general"] = GENERAL
    spec = build_plan(raw, workdir=str(tmp_path), results=str(tmp_path / "results")).experiments["curriculum"]
    assert stages_text(SimpleNamespace(spec=spec)) == "pt:lora > sft:lora[general 0.2 + colmap]"


# --------------------------------------------------------------------------- the DAG


@pytest.mark.workflow
def test_dry_run_lists_one_tokenize_job_per_member(tmp_path):
    raw = raw_config({"mixed": EXPERIMENTS["concat"], "task": {}})
    raw["datasets"]["general"] = GENERAL
    (tmp_path / "config.yaml").write_text(json.dumps(raw))
    proc = snakemake(tmp_path, "-n", "--cores", "1", "--configfile", str(tmp_path / "config.yaml"))
    jobs = planned_jobs(proc.stdout)
    tokenize = sorted(wildcards for rule, wildcards in jobs if rule == "tokenize")
    assert [w.split("=")[1].rsplit("-", 1)[0] for w in tokenize] == ["colmap", "general"], tokenize
    assert {wildcards for rule, wildcards in jobs if rule == "train"} == {
        "experiment=mixed, stage=train",
        "experiment=task, stage=train",
    }
