"""examples/poems-full-vs-lora.yaml end to end in smoke mode, on a local JSONL of poems
given by a second --configfile (the example's own source is the hub)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from helpers import REPO, snakemake

pytestmark = pytest.mark.workflow

LINES = ["春眠不觉晓", "处处闻啼鸟", "床前明月光", "疑是地上霜", "白日依山尽", "黄河入海流", "红豆生南国", "春来发几枝"]
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def poems_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("poems")
    shutil.copy(REPO / "examples" / "poems-full-vs-lora.yaml", workdir / "poems.yaml")
    (workdir / "data").mkdir()
    rows = [{"title": f"无题其{i}", "content": f"{LINES[i % 8]}，{LINES[(i + 3) % 8]}。"} for i in range(40)]
    rows[5] = {"title": "缺内容"}  # a bad row: counted, not fatal
    (workdir / "data" / "poems.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    local = "datasets:\n  chinese-poems: {source: data/poems.jsonl, splits: {validation: 4, test: 4}}\n"
    (workdir / "local.yaml").write_text(local, encoding="utf-8")
    snakemake(
        workdir,
        "--cores",
        "2",
        "--configfile",
        str(workdir / "poems.yaml"),
        str(workdir / "local.yaml"),
        "--config",
        "smoke=true",
    )
    return workdir


def test_full_and_lora_train_merge_and_are_scored(poems_run: Path):
    results = poems_run / "results"
    model_config = json.loads((results / "models" / "qwen3-0.6b.smoke" / "config.json").read_text())
    assert model_config["model_type"] == "qwen3", "the smoke stand-in is of the same architecture family"
    data = [p for p in (results / "data").iterdir() if p.is_dir()]
    assert len(data) == 1, "both experiments and the baseline share one tokenization"
    stats = json.loads((data[0] / "stats.json").read_text())
    assert stats["held_out_from_train"] == {"validation": 4, "test": 4}
    dropped = [s["dropped"] for s in stats["splits"].values() if s["dropped"]]
    assert dropped == [{"missing_column": 1}], "the row without content is counted, the rest trained on"
    adapter = json.loads((results / "lora-r8" / "train" / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], set(adapter["target_modules"])) == (8, 32, PROJECTIONS)
    assert list((results / "full" / "train" / "model").glob("*.safetensors"))
    for exp in ("full", "lora-r8"):
        assert json.loads((results / exp / "train" / "train_metrics.json").read_text())["status"] == "ok"
        assert list((results / exp / "train" / "merged").glob("*.safetensors"))
    for exp in ("full", "lora-r8", "baseline"):
        metrics = json.loads((results / exp / "eval" / "metrics.json").read_text())
        assert metrics["status"] == "ok" and {"chrf", "bleu"} <= set(metrics["metrics"]), metrics["metrics"]
    rows = list(csv.DictReader((results / "report" / "summary.csv").open()))
    assert sorted(r["experiment"] for r in rows) == ["baseline", "full", "lora-r8"]
