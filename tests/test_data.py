"""Tokenization: label masks token by token on the embedded model's real chat template,
every kind, every drop reason, and stats.json from a real `tokenize` run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftflow.data import IGNORE, Encoder, RowError, tokenize
from ftflow.encoding import split_template, template_columns
from ftflow.errors import FtflowError
from ftflow.sources import SourceRow

CHAT = {"messages_column": "messages", "loss_on": "assistant", "truncation": "drop"}
POEM = {
    "prompt": "请创作一首古诗，主题关于{title}：\n",
    "completion": "{content}",
    "loss_on": "completion",
    "truncation": "drop",
}


def labelled_text(tokenizer, record) -> str:
    return tokenizer.decode([t for t, label in zip(record["input_ids"], record["labels"]) if label != IGNORE])


# --------------------------------------------------------------------------- chat


def test_chat_labels_only_assistant_turns(embedded_tokenizer):
    messages = [
        {"role": "system", "content": "You map headers."},
        {"role": "user", "content": "Headers: a | b"},
        {"role": "assistant", "content": '{"a": "x"}'},
        {"role": "user", "content": "And c?"},
        {"role": "assistant", "content": '{"c": "y"}'},
    ]
    record = Encoder(embedded_tokenizer, "chat", CHAT, 512).encode({"messages": messages})
    ids, labels = record["input_ids"], record["labels"]
    assert len(ids) == len(labels)
    # token by token: a label is IGNORE or the token itself, and exactly the answers' tokens are labelled
    assert all(label in (IGNORE, t) for t, label in zip(ids, labels))
    answer_ids = [
        embedded_tokenizer(a + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
        for a in ('{"a": "x"}', '{"c": "y"}')
    ]
    assert [t for t, label in zip(ids, labels) if label != IGNORE] == answer_ids[0] + answer_ids[1]
    runs = [i for i in range(len(labels)) if labels[i] != IGNORE and (i == 0 or labels[i - 1] == IGNORE)]
    assert len(runs) == 2, "two labelled runs, one per assistant turn"
    assert embedded_tokenizer.decode(ids[: runs[0]]).endswith("<|im_start|>assistant\n")
    ignored = embedded_tokenizer.decode([t for t, label in zip(ids, labels) if label == IGNORE])
    for text in ("You map headers.", "Headers: a | b", "And c?"):
        assert text in ignored
    # eval prompt ends with the generation prompt; the reference is the last answer
    prompt = embedded_tokenizer.decode(record["prompt_ids"])
    assert prompt.endswith("<|im_start|>assistant\n") and '{"c": "y"}' not in prompt and '{"a": "x"}' in prompt
    assert record["reference"] == '{"c": "y"}'


def test_chat_loss_on_all(embedded_tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    record = Encoder(embedded_tokenizer, "chat", {**CHAT, "loss_on": "all"}, 512).encode({"messages": messages})
    assert record["labels"] == record["input_ids"]


# Like Qwen3's template: only the last assistant turn shows its reasoning block, so
# rendering the chat up to an earlier turn is not a prefix of the whole chat.
REWRITING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_template_that_rewrites_earlier_turns(embedded_tokenizer):
    encoding = {**CHAT, "chat_template": REWRITING_TEMPLATE}
    messages = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "second answer"},
    ]
    record = Encoder(embedded_tokenizer, "chat", encoding, 512).encode({"messages": messages})
    text = embedded_tokenizer.decode(record["input_ids"])
    assert text == (
        "<|im_start|>user\none<|im_end|>\n<|im_start|>assistant\nfirst answer<|im_end|>\n"
        "<|im_start|>user\ntwo<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nsecond answer<|im_end|>\n"
    )
    assert (
        labelled_text(embedded_tokenizer, record)
        == "first answer<|im_end|>\n<think>\n\n</think>\n\nsecond answer<|im_end|>\n"
    )
    assert embedded_tokenizer.chat_template != REWRITING_TEMPLATE, "the caller's tokenizer is left as it was"


def test_missing_chat_template_is_a_clear_error(embedded_tokenizer):
    saved = embedded_tokenizer.chat_template
    embedded_tokenizer.chat_template = None
    try:
        with pytest.raises(FtflowError, match=r"datasets\.colmap\.chat_template: the tokenizer has no chat template"):
            Encoder(embedded_tokenizer, "chat", CHAT, 512, "colmap")
        # a supplied template makes the same tokenizer usable
        record = Encoder(embedded_tokenizer, "chat", {**CHAT, "chat_template": REWRITING_TEMPLATE}, 512).encode(
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
        )
        assert labelled_text(embedded_tokenizer, record) == "<think>\n\n</think>\n\na<|im_end|>\n"
    finally:
        embedded_tokenizer.chat_template = saved


# --------------------------------------------------------------------------- instruction and text


def test_instruction_template_masks_the_prompt(embedded_tokenizer):
    row = {"title": "春", "content": "春眠不觉晓，处处闻啼鸟。"}
    record = Encoder(embedded_tokenizer, "instruction", POEM, 256).encode(row)
    assert labelled_text(embedded_tokenizer, record) == "春眠不觉晓，处处闻啼鸟。<|im_end|>"
    assert record["reference"] == "春眠不觉晓，处处闻啼鸟。"
    prompt_ids = record["prompt_ids"]
    assert record["input_ids"][: len(prompt_ids)] == prompt_ids
    assert all(label == IGNORE for label in record["labels"][: len(prompt_ids)])
    assert embedded_tokenizer.decode(prompt_ids).endswith("请创作一首古诗，主题关于春：\n")
    everything = Encoder(embedded_tokenizer, "instruction", {**POEM, "loss_on": "all"}, 256).encode(row)
    assert everything["labels"] == everything["input_ids"] == record["input_ids"]


def test_template_split_and_columns():
    assert split_template("请创作一首古诗，主题关于{title}：\n{content}") == (
        "请创作一首古诗，主题关于{title}：\n",
        "{content}",
    )
    assert split_template("{{literal}} {a!r:>4} then {b}") == ("{{literal}} {a!r:>4} then ", "{b}")
    assert template_columns("{q}\n{a}\n{q}") == ["q", "a"]
    for bad in ("no placeholder", "{}", "{0}", "{a.b}", "{a", "{a:{w}}"):
        with pytest.raises(ValueError):
            split_template(bad)


def test_text_is_joined_and_cut_into_full_blocks_without_padding(tokenizer_dir, embedded_tokenizer, tmp_path):
    docs = ["The first document is about rivers and the sea. " * 3, "A second, shorter one.", "Third: " + "words " * 40]
    (tmp_path / "corpus").mkdir()
    for i, doc in enumerate(docs):
        (tmp_path / "corpus" / f"{i}.txt").write_text(doc, encoding="utf-8")
    spec = write_spec(
        tmp_path,
        tokenizer_dir,
        kind="text",
        source="corpus/*.txt",
        source_options={"text_split": "file"},
        encoding={"text_column": "text"},
        max_length=16,
        splits={"validation": 0, "test": 0, "seed": 0},
    )
    stats = tokenize(spec, str(tmp_path / "out"), workdir=str(tmp_path))
    from datasets import load_from_disk

    train = load_from_disk(str(tmp_path / "out" / "train"))
    eos = embedded_tokenizer.eos_token_id
    stream = []
    for doc in docs:
        stream += embedded_tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]
    blocks = [stream[i : i + 16] for i in range(0, len(stream), 16)]
    assert train["input_ids"] == blocks and train["labels"] == blocks
    assert all(n == 16 for n in train["length"][:-1]), "every block but the last is full: no padding"
    split = stats["splits"]["train"]
    assert (split["rows_in"], split["kept"], split["blocks"], split["tokens"]) == (3, 3, len(blocks), len(stream))
    assert set(stats["splits"]) == {"train"}, "validation: 0 and test: 0 cut nothing"


# --------------------------------------------------------------------------- drop reasons


def _messages(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


BAD_ROWS = [
    ("chat", {"other": 1}, "missing_column"),
    ("chat", {"messages": []}, "empty"),
    ("chat", {"messages": _messages(("user", "only a question"))}, "empty"),
    ("chat", {"messages": _messages(("user", "q"), ("assistant", "  "))}, "empty"),
    ("chat", {"messages": "not json ["}, "invalid_messages"),
    ("chat", {"messages": [{"from": "human", "value": "q"}]}, "invalid_messages"),
    ("chat", {"messages": _messages(("user", "q " * 600), ("assistant", "a"))}, "over_length"),
    ("chat_strict", {"messages": _messages(("tool", "q"), ("assistant", "a"))}, "template_error"),
    ("instruction", {"title": "t"}, "missing_column"),
    ("instruction", {"title": "t", "content": "  \n"}, "empty"),
    ("instruction", {"title": None, "content": "c"}, "empty"),
    ("instruction_format", {"n": "not a number", "content": "c"}, "template_error"),
    ("instruction", {"title": "t", "content": "长" * 600}, "over_length"),
    ("instruction_truncate", {"title": "题" * 300, "content": "诗"}, "no_label_tokens"),
    ("text", {"body": "x"}, "missing_column"),
    ("text", {"text": " "}, "empty"),
]
STRICT = "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('unknown role ' + m.role) }}{% endif %}{{ m.content }}{% endfor %}"


def _encoder(tokenizer, case: str) -> Encoder:
    if case == "chat_strict":
        return Encoder(tokenizer, "chat", {**CHAT, "chat_template": STRICT}, 512)
    if case == "instruction_format":
        return Encoder(tokenizer, "instruction", {"prompt": "第{n:d}首：", "completion": "{content}"}, 512)
    if case == "instruction_truncate":
        return Encoder(tokenizer, "instruction", {**POEM, "truncation": "truncate"}, 128)
    kind = case.split("_")[0]
    encoding = {"chat": CHAT, "instruction": POEM, "text": {"text_column": "text"}}[kind]
    return Encoder(tokenizer, kind, encoding, 512)


@pytest.mark.parametrize("case, row, reason", BAD_ROWS, ids=[f"{c}-{r}" for c, _, r in BAD_ROWS])
def test_bad_row_is_dropped_with_its_reason(embedded_tokenizer, case, row, reason):
    result = _encoder(embedded_tokenizer, case).encode_rows([SourceRow("x.jsonl line 7", row)])[0]
    assert isinstance(result, RowError) and result.reason == reason, result


def test_truncate_keeps_the_row_and_says_so(embedded_tokenizer):
    record = _encoder(embedded_tokenizer, "instruction_truncate").encode({"title": "t", "content": "长" * 600})
    assert len(record["input_ids"]) == len(record["labels"]) == 128 and record["truncated"]
    n = len(record["prompt_ids"])
    assert record["labels"][:n] == [IGNORE] * n and record["labels"][n:] == record["input_ids"][n:]


# --------------------------------------------------------------------------- the tokenize step


def write_spec(tmp_path: Path, tokenizer_dir: Path, **settings) -> str:
    spec = {
        "data_id": "d-test",
        "dataset": settings.pop("dataset", "poems"),
        "kind": "instruction",
        "source": "poems.jsonl",
        "source_options": {},
        "encoding": POEM,
        "splits": {"validation": 1, "test": 1, "seed": 0},
        "max_length": 64,
        "row_caps": None,
        "model_dir": str(tokenizer_dir),
    }
    spec.update(settings)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return str(path)


def test_stats_count_every_drop_reason_and_keep_the_rest(tokenizer_dir, tmp_path):
    good = [{"title": f"题{i}", "content": "春眠不觉晓，处处闻啼鸟。"} for i in range(6)]
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in good]
    lines += [
        b'{"title": "no content"}',  # missing_column
        '{"title": "空", "content": ""}'.encode(),  # empty
        b'{"title": "\xff\xfe", "content": "x"}',  # not_utf8
        b"{not json",  # invalid_json
        json.dumps({"title": "长", "content": "长" * 200}, ensure_ascii=False).encode(),  # over_length
    ]
    (tmp_path / "poems.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    spec = write_spec(tmp_path, tokenizer_dir, splits={"validation": 0, "test": 0, "seed": 0})
    stats = tokenize(spec, str(tmp_path / "out"), workdir=str(tmp_path))
    train = stats["splits"]["train"]
    assert train["rows_in"] == 11 and train["kept"] == 6
    assert train["dropped"] == {"missing_column": 1, "empty": 1, "not_utf8": 1, "invalid_json": 1, "over_length": 1}
    assert train["first_dropped"]["missing_column"] == {"row": "poems.jsonl line 7", "detail": "content"}
    assert train["first_dropped"]["not_utf8"]["row"] == "poems.jsonl line 9"
    assert train["truncated"] == 0
    saved = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert saved == json.loads(json.dumps(stats))
    from datasets import load_from_disk

    data = load_from_disk(str(tmp_path / "out" / "train"))
    assert {"input_ids", "labels", "length", "prompt_ids", "reference", "source_row"} <= set(data.column_names)
    assert data["source_row"] == [f"poems.jsonl line {i}" for i in range(1, 7)], "kept rows in source order"
    assert train["tokens"] == sum(data["length"]) == sum(len(x) for x in data["input_ids"])
    assert train["label_tokens"] == sum(sum(1 for t in labels[1:] if t != IGNORE) for labels in data["labels"])
    assert (
        train["lengths"]["count"] == 6 and train["lengths"]["min"] <= train["lengths"]["p50"] <= train["lengths"]["max"]
    )


def test_truncated_rows_are_counted(tokenizer_dir, tmp_path):
    rows = [{"title": "t", "content": "长" * n} for n in (5, 200, 300)]
    (tmp_path / "poems.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    spec = write_spec(
        tmp_path,
        tokenizer_dir,
        encoding={**POEM, "truncation": "truncate"},
        splits={"validation": 0, "test": 0, "seed": 0},
    )
    train = tokenize(spec, str(tmp_path / "out"), workdir=str(tmp_path))["splits"]["train"]
    assert (train["kept"], train["truncated"], train["lengths"]["max"]) == (3, 2, 64)


def test_a_split_where_every_row_is_bad_names_dataset_column_and_row(tokenizer_dir, tmp_path):
    rows = [{"titel": "春", "content": "春眠不觉晓"}] * 5
    (tmp_path / "poems.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    spec = write_spec(tmp_path, tokenizer_dir, splits={"validation": 0, "test": 0, "seed": 0})
    with pytest.raises(FtflowError) as info:
        tokenize(spec, str(tmp_path / "out"), workdir=str(tmp_path))
    message = str(info.value)
    assert (
        "datasets.poems" in message
        and "'title'" in message
        and "poems.jsonl line 1" in message
        and "5 x missing_column" in message
    )
    assert not (tmp_path / "out").exists(), "no output is left behind"


def jsonl_file(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_a_split_that_loses_over_5_percent_of_its_rows_is_a_warning(tokenizer_dir, tmp_path, caplog):
    short = {"title": "春", "content": "春眠不觉晓，处处闻啼鸟。"}
    long = {"title": "长", "content": "长" * 200}
    # train: 5 rows too long and 1 without its answer column of 20 (30%); test: 1 of 25 too long (4%)
    jsonl_file(tmp_path / "train.jsonl", [short] * 14 + [long] * 5 + [{"title": "x"}])
    jsonl_file(tmp_path / "test.jsonl", [short] * 24 + [long])
    spec = write_spec(
        tmp_path,
        tokenizer_dir,
        source={"train": "train.jsonl", "test": "test.jsonl"},
        splits={"validation": 0, "seed": 0},
    )
    with caplog.at_level("WARNING", logger="ftflow.data"):
        stats = tokenize(spec, str(tmp_path / "out"), workdir=str(tmp_path))
    fix = (
        "raise max_length (now 64; the longest dropped row has 628 tokens) or set truncation: truncate; "
        "name the right columns (template, messages_column, text_column) or map the format with `format:`"
    )
    assert stats["warnings"] == [
        {
            "split": "train",
            "share": 0.3,
            "dropped": 6,
            "rows_in": 20,
            "reasons": {"over_length": 5, "missing_column": 1},
            "fix": fix,
            "message": f"datasets.poems: 30% of the train rows dropped (6 of 20: 5 over_length, 1 missing_column); {fix}",
        }
    ], "the test split lost 4%: no warning"
    assert stats["splits"]["test"]["dropped"] == {"over_length": 1} and stats["splits"]["test"]["kept"] == 24
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["warnings"] == stats["warnings"]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [stats["warnings"][0]["message"]]


def test_an_empty_split_is_an_error_naming_its_source(tokenizer_dir, tmp_path):
    jsonl_file(tmp_path / "train.jsonl", [{"title": "春", "content": "春眠不觉晓"}] * 4)
    (tmp_path / "test.jsonl").write_text("\n", encoding="utf-8")
    spec = write_spec(
        tmp_path, tokenizer_dir, source={"train": "train.jsonl", "test": "test.jsonl"}, splits={"validation": 0}
    )
    with pytest.raises(FtflowError) as info:
        tokenize(spec, str(tmp_path / "out"), workdir=str(tmp_path))
    assert str(info.value) == (
        "datasets.poems.source.test: the test split has no rows; give it rows, or leave it out of the source "
        "so that `splits` cuts it from train"
    )


# Thirty two-line paragraphs, as a user's corpus.txt: one document per line by default.
PARAGRAPHS = "\n\n".join(f"Paragraph {i} starts here.\nIt ends on this line, number {i}." for i in range(30)) + "\n"


@pytest.mark.parametrize("text_split, rows", [("line", (48, 6, 6)), ("paragraph", (24, 3, 3))])
def test_one_text_file_gives_validation_and_test_blocks(tokenizer_dir, tmp_path, text_split, rows):
    (tmp_path / "corpus.txt").write_text(PARAGRAPHS, encoding="utf-8")
    spec = write_spec(
        tmp_path,
        tokenizer_dir,
        kind="text",
        source="corpus.txt",
        source_options={"text_split": text_split},
        encoding={"text_column": "text"},
        max_length=16,
        splits={"validation": 0.1, "test": 0.1, "seed": 0},
    )
    stats = tokenize(spec, str(tmp_path / "out"), workdir=str(tmp_path))
    assert tuple(stats["splits"][s]["rows_in"] for s in ("train", "validation", "test")) == rows
    from datasets import load_from_disk

    for split in ("validation", "test"):
        blocks = load_from_disk(str(tmp_path / "out" / split))
        assert len(blocks) == stats["splits"][split]["blocks"] >= 1 and blocks["input_ids"][0] == blocks["labels"][0]
    assert stats["warnings"] == []


def test_a_text_file_read_whole_cannot_be_split_and_says_how_to(tokenizer_dir, tmp_path, caplog):
    (tmp_path / "corpus.txt").write_text(PARAGRAPHS, encoding="utf-8")
    spec = write_spec(
        tmp_path,
        tokenizer_dir,
        kind="text",
        source="corpus.txt",
        source_options={"text_split": "file"},
        encoding={"text_column": "text"},
        splits={"validation": 0.1, "test": 0.1, "seed": 0},
    )
    with pytest.raises(FtflowError) as info:
        tokenize(spec, str(tmp_path / "out"), workdir=str(tmp_path))
    assert str(info.value) == (
        "datasets.poems.splits.validation: 0.1 of 1 training row holds out no row (a fraction needs at least 3 rows); "
        "give more rows or ask for a row count (with text_split: file a .txt file is one row; "
        "text_split: line or paragraph gives one per line or paragraph)"
    )
    spec = write_spec(
        tmp_path,
        tokenizer_dir,
        kind="text",
        source="corpus.txt",
        source_options={"text_split": "file"},
        encoding={"text_column": "text"},
        splits=None,
    )
    with caplog.at_level("WARNING", logger="ftflow.data"):
        stats = tokenize(spec, str(tmp_path / "out"), workdir=str(tmp_path))
    assert list(stats["splits"]) == ["train"], "the default holds out nothing from one row..."
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "poems: no validation split, from 1 training row",
        "poems: no test split, from 1 training row",
    ], "...and says so"


def test_generator_is_deterministic_and_splits_do_not_share_rows():
    from ftflow.generators.column_mapping import generate

    a, b = generate(seed=5, train=50, validation=10, test=10), generate(seed=5, train=50, validation=10, test=10)
    assert a == b
    keys = {split: {json.dumps(r["messages"][1]) for r in rows} for split, rows in a.items()}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]
    answer = json.loads(a["test"][0]["messages"][2]["content"])
    assert isinstance(answer, dict) and answer


def test_worker_processes_only_for_python_bound_rows_and_same_result(embedded_tokenizer, monkeypatch):
    import ftflow.data as data
    from ftflow.sources import load_source

    assert data.choose_num_proc(100_000, 8, python_bound=False) == 1, "a fast tokenizer parallelizes itself"
    assert data.choose_num_proc(4_999, 8, python_bound=True) == 1
    assert data.choose_num_proc(12_000, 8, python_bound=True) == 2
    assert data.choose_num_proc(10**6, 8, python_bound=True) == 8
    rows = load_source(
        {
            "dataset": "c",
            "source": "generator:column_mapping",
            "source_options": {"args": {"train": 40, "validation": 0, "test": 0}},
        }
    )["train"]
    encoder = Encoder(embedded_tokenizer, "chat", CHAT, 512)
    one, used_one = data.encode_split(rows, encoder, 1)
    monkeypatch.setattr(data, "ROWS_PER_PROCESS", 10)
    two, used_two = data.encode_split(rows, encoder, 2)
    assert (used_one, used_two) == (1, 2)
    assert one.to_list() == two.to_list(), "worker processes change nothing but the time"
