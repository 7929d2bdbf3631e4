"""Tokenization: label masks checked token by token on the embedded model's real chat template."""

from __future__ import annotations

import json

import pytest

from ftflow.data import IGNORE, Encoder, RowError, cut_splits, split_template

CHAT = {"name": "d", "kind": "chat", "max_length": 512, "truncation": "drop"}


def labelled_text(tokenizer, record) -> str:
    return tokenizer.decode([t for t, l in zip(record["input_ids"], record["labels"]) if l != IGNORE])


def test_chat_labels_only_assistant_turns(embedded_tokenizer):
    messages = [
        {"role": "system", "content": "You map headers."},
        {"role": "user", "content": "Headers: a | b"},
        {"role": "assistant", "content": '{"a": "x"}'},
        {"role": "user", "content": "And c?"},
        {"role": "assistant", "content": '{"c": "y"}'},
    ]
    record = Encoder(embedded_tokenizer, CHAT, 512).encode({"messages": messages})
    ids, labels = record["input_ids"], record["labels"]
    assert len(ids) == len(labels)
    # token by token: a label is either IGNORE or the token itself
    assert all(l in (IGNORE, t) for t, l in zip(ids, labels))
    assert labelled_text(embedded_tokenizer, record) == '{"a": "x"}<|im_end|>\n{"c": "y"}<|im_end|>\n'
    # system and user text carry no label
    ignored = embedded_tokenizer.decode([t for t, l in zip(ids, labels) if l == IGNORE])
    for text in ("You map headers.", "Headers: a | b", "And c?", "<|im_start|>assistant\n"):
        assert text in ignored
    # eval prompt ends with the generation prompt; the reference is the last answer
    prompt = embedded_tokenizer.decode(record["prompt_ids"])
    assert prompt.endswith("<|im_start|>assistant\n") and '{"c": "y"}' not in prompt
    assert record["reference"] == '{"c": "y"}'


def test_chat_loss_on_all(embedded_tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    record = Encoder(embedded_tokenizer, {**CHAT, "loss_on": "all"}, 512).encode({"messages": messages})
    assert record["labels"] == record["input_ids"]


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"other": 1}, "missing_column"),
        ({"messages": []}, "empty"),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "empty"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "empty"),
        ({"messages": [{"role": "user", "content": "q " * 600}, {"role": "assistant", "content": "a"}]}, "over_length"),
    ],
)
def test_chat_bad_rows(embedded_tokenizer, row, reason):
    with pytest.raises(RowError) as info:
        Encoder(embedded_tokenizer, CHAT, 512).encode(row)
    assert info.value.reason == reason


def test_missing_chat_template_is_a_clear_error(embedded_tokenizer):
    from ftflow.errors import FtflowError

    tokenizer = embedded_tokenizer
    saved = tokenizer.chat_template
    tokenizer.chat_template = None
    try:
        with pytest.raises(FtflowError, match="chat_template"):
            Encoder(tokenizer, CHAT, 512)
    finally:
        tokenizer.chat_template = saved


def test_instruction_template_masks_the_prompt(embedded_tokenizer):
    dataset = {"name": "poems", "kind": "instruction", "template": "请创作一首古诗，主题关于{title}：\n{content}", "max_length": 256}
    row = {"title": "春", "content": "春眠不觉晓，处处闻啼鸟。"}
    record = Encoder(embedded_tokenizer, dataset, 256).encode(row)
    assert labelled_text(embedded_tokenizer, record) == "春眠不觉晓，处处闻啼鸟。<|im_end|>"
    assert record["reference"] == "春眠不觉晓，处处闻啼鸟。"
    assert embedded_tokenizer.decode(record["prompt_ids"]).endswith("请创作一首古诗，主题关于春：\n")


def test_split_template():
    assert split_template("请创作一首古诗，主题关于{title}：\n{content}") == ("请创作一首古诗，主题关于{title}：\n", "{content}")


def test_cut_splits_is_deterministic_and_disjoint():
    rows = [{"i": i} for i in range(100)]
    first = cut_splits({"train": rows}, {"validation": 10, "test": 0.2, "seed": 3}, "d")
    again = cut_splits({"train": rows}, {"validation": 10, "test": 0.2, "seed": 3}, "d")
    assert first == again
    assert (len(first["train"]), len(first["validation"]), len(first["test"])) == (70, 10, 20)
    seen = [r["i"] for split in first.values() for r in split]
    assert sorted(seen) == list(range(100))


def test_generator_is_deterministic_and_splits_do_not_share_rows():
    from ftflow.generators.column_mapping import generate

    a, b = generate(seed=5, train=50, validation=10, test=10), generate(seed=5, train=50, validation=10, test=10)
    assert a == b
    keys = {split: {json.dumps(r["messages"][1]) for r in rows} for split, rows in a.items()}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]
    answer = json.loads(a["test"][0]["messages"][2]["content"])
    assert isinstance(answer, dict) and answer
