"""Real snakemake runs in smoke mode: every output path, and rerun-only-what-changed."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from helpers import REPO, WARM_LINE, planned_jobs, snakemake

pytestmark = pytest.mark.workflow

CONFIG = REPO / "tests" / "configs" / "rerun.yaml"
TUNED = ["a", "b", "full", "r-1", "r-2"]
PINNED_SECOND_LOSS = {"a": 10.8422, "b": 10.8469, "full": 10.8312, "r-1": 10.8443, "r-2": 10.8434}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("smoke")
    shutil.copy(CONFIG, workdir / "config.yaml")
    snakemake(workdir, "--cores", "2", "--config", "smoke=true")
    return workdir


def test_every_output_path_exists(smoke_run: Path):
    results = smoke_run / "results"
    model = results / "models" / "smol.smoke"
    assert (model / "config.json").exists() and list(model.glob("*.safetensors"))
    data = [p for p in (results / "data").iterdir() if p.is_dir()]
    assert len(data) == 1, "all experiments share one tokenization"
    stats = json.loads((data[0] / "stats.json").read_text())
    assert stats["splits"]["train"]["kept"] > 0
    for exp in TUNED:
        config = json.loads((results / exp / "config.json").read_text())
        stage = results / exp / "train"
        metrics = json.loads((stage / "train_metrics.json").read_text())
        assert metrics["status"] == "ok" and metrics["steps"] == 2
        losses = [entry["loss"] for entry in metrics["losses"]]
        assert losses[0] == pytest.approx(10.8425, rel=1e-4), "same seed, same stand-in model, same first batch"
        assert losses[1] == pytest.approx(PINNED_SECOND_LOSS[exp], rel=1e-4)
        for key in ("ftflow_version", "git_commit", "packages", "config_hash", "device"):
            assert key in metrics["provenance"]
        weights = stage / ("model" if config["stages"][0]["method"] == "full" else "adapter")
        assert list(weights.glob("*.safetensors")), weights
        assert list((stage / "tb").glob("events.out.tfevents.*"))
        assert list((stage / "merged").glob("*.safetensors"))
        assert not (stage / "checkpoints").exists(), "checkpoints are removed after success"
    for exp in TUNED + ["baseline"]:
        ev = json.loads((results / exp / "eval" / "metrics.json").read_text())
        assert ev["status"] == "ok"
        assert ev["eval_loss"] > 0 and "exact_match" in ev["metrics"]
        assert "provenance" in ev
        lines = (results / exp / "eval" / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == 8 and {"prompt", "reference", "prediction", "scores"} <= set(json.loads(lines[0]))
    rows = list(csv.DictReader((results / "report" / "summary.csv").open()))
    assert sorted(r["experiment"] for r in rows) == sorted(TUNED + ["baseline"])
    assert sum(1 for r in rows if r["best"] == "*") == 1
    for name in ("report.html", "report.md"):
        assert (results / "report" / name).stat().st_size > 0
    assert (results / "report" / "plots" / "train_loss.png").stat().st_size > 0
    html = (results / "report" / "report.html").read_text()
    for exp in TUNED:
        log = smoke_run / "logs" / exp / "train" / "train.log"
        # progress lines: the first step and the last (a 2-step run is shorter than the interval)
        text = log.read_text()
        assert re.search(r"progress: step 1/2 \(50%\), loss 10\.8\d+, \d+ tokens/s", text), text
        assert "progress: step 2/2 (100%), loss " in text, text
        assert " tokens/s (" in text and "ETA 0s" in text
        if exp != "full":  # the LoRA layers train with ftflow's CPU forward, and the log says so
            assert re.search(r"LoRA: \d+ layers train with ftflow's CPU forward", text), text
        assert (smoke_run / "benchmarks" / exp / "train" / "train.tsv").exists()
    logs = {r["experiment"]: r["log"] for r in rows}
    assert logs == {**{exp: f"logs/{exp}/train/train.log" for exp in TUNED}, "baseline": "logs/baseline/eval.log"}
    assert '<a href="../../logs/a/train/train.log">' in html  # the report links each run's log
    # a warm job's log gives its peak memory and CPU time (its benchmark file measures the client)
    train_log = (smoke_run / "logs" / "a" / "train" / "train.log").read_text()
    assert not WARM_LINE.search(train_log) or re.search(
        r"ftflow: warm job \d+ used peak RSS \d+\.\d\d GiB and \d+\.\d s of CPU", train_log
    ), train_log[-2000:]
    assert "- a: `logs/a/train/train.log`" in (results / "report" / "report.md").read_text()


def test_nothing_to_do_after_a_run(smoke_run: Path):
    out = snakemake(smoke_run, "-n", "--cores", "2", "--config", "smoke=true").stdout
    assert "Nothing to be done" in out, out


def _edit(workdir: Path, change) -> None:
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    change(config)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def _jobs_by_experiment(workdir: Path) -> dict[str, set[str]]:
    out = snakemake(workdir, "-n", "--cores", "2", "--config", "smoke=true").stdout
    by_exp: dict[str, set[str]] = {}
    for rule, wildcards in planned_jobs(out):
        exp = dict(part.split("=", 1) for part in wildcards.split(", ") if "=" in part).get("experiment", "-")
        by_exp.setdefault(exp, set()).add(rule)
    return by_exp


def test_editing_one_experiment_reruns_only_it(smoke_run: Path, tmp_path: Path):
    work = tmp_path / "w"
    shutil.copytree(smoke_run, work, symlinks=True)
    _edit(work, lambda c: c["experiments"]["b"]["training"].update(learning_rate=2.0e-4))
    assert _jobs_by_experiment(work) == {"b": {"train", "merge", "evaluate"}, "-": {"report", "all"}}


def test_editing_a_default_reruns_exactly_the_experiments_it_affects(smoke_run: Path, tmp_path: Path):
    work = tmp_path / "w"
    shutil.copytree(smoke_run, work, symlinks=True)
    # lora settings reach the LoRA experiments and the sweep, not full fine-tuning or the baseline
    _edit(work, lambda c: c["defaults"]["lora"].update(lora_dropout=0.1))
    jobs = _jobs_by_experiment(work)
    assert set(jobs) == {"a", "b", "r-1", "r-2", "-"}
    assert all(jobs[e] == {"train", "merge", "evaluate"} for e in ("a", "b", "r-1", "r-2"))
