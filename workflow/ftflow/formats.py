"""Chat rows in the formats people bring, turned into the one conversation a chat template renders.

Formats (`datasets.<name>.format`, kind chat), read with the field names of the tools they come from:

  openai    {messages: [{role, content}], tools}: content a string or text parts
            [{type: text, text}]; assistant messages may carry `tool_calls` (content null),
            `tool` messages answer them (`tool_call_id`)
  sharegpt  {conversations: [{from, value}], system, tools} (LLaMA-Factory): turns from human,
            gpt, system, function_call (a call as JSON text) and observation (the tool's
            answer); `tags` renames the keys and role names
  alpaca    {instruction, input, output, system, history: [[user, assistant], ...], tools}:
            instruction and input (joined by a newline when input is not empty) are the user
            turn, output the answer, history the turns before it

`conversation` gives the messages (with assistant `tool_calls` in the form
`apply_chat_template` takes), the tools for its `tools=` argument, and which messages carry
labels: a message's `loss_weight` (0 or 1) where the row gives one, else whether its role is
in `roles_to_train`; tool answers never; with `mask_history`, only the last of them. A row
that does not fit its format raises RowError (missing_column, empty, invalid_messages).

Standard library only: the planner imports it to check a local file's first rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from .errors import RowError

# A tokenization spec without format keys (encoding.CHAT_FORMAT_KEYS) means the openai format
# at the schema's defaults; config/datasets.py checks at import that the schema says the same.
SETTINGS_WHEN_ABSENT = {
    "format": "openai",
    "columns": {"tools": "tools"},
    "tags": None,
    "roles_to_train": ["assistant"],
    "mask_history": False,
}


@dataclass(frozen=True)
class Conversation:
    """A row as the chat template takes it, and which of its messages carry labels."""

    messages: list[dict]  # {role, content}; assistant tool_calls; tool messages
    trainable: list[bool]  # one per message
    tools: list[dict] | None  # the template's `tools=` argument

    @property
    def uses_tools(self) -> bool:
        """Tools or tool calls, which only a template with tool support renders (a `tool`
        message alone is a role like any other to a template)."""
        return bool(self.tools) or any(m.get("tool_calls") for m in self.messages)


def settings_of(encoding: dict) -> dict:
    """The format settings of a tokenization spec's encoding, the absent ones filled in."""
    settings = {key: encoding.get(key, default) for key, default in SETTINGS_WHEN_ABSENT.items()}
    settings["messages_column"] = encoding.get("messages_column") or "messages"
    return settings


def template_supports_tools(template: str) -> bool:
    """Whether a chat template can render tools: its source mentions `tools` or `tool_calls`."""
    return "tools" in template or "tool_calls" in template


def conversation(values: dict, settings: dict) -> Conversation:
    messages, weights = READERS[settings["format"]](values, settings)
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("empty", "no assistant message")
    for message in messages:
        if message["role"] == "assistant" and not message.get("tool_calls") and not message["content"].strip():
            raise RowError("empty", "an assistant message is empty")
    tools = _tools(values, (settings["columns"] or {}).get("tools"))
    roles = set(settings["roles_to_train"])
    trainable = [
        message["role"] != "tool" and (message["role"] in roles if weight is None else weight == 1)
        for message, weight in zip(messages, weights)
    ]
    if settings["mask_history"] and any(trainable):
        last = max(i for i, flag in enumerate(trainable) if flag)
        trainable = [i == last for i in range(len(trainable))]
    return Conversation(messages, trainable, tools)


# --------------------------------------------------------------------------- the formats


def read_openai(values: dict, settings: dict) -> tuple[list[dict], list[int | None]]:
    items = _message_list(values, settings["messages_column"])
    messages, weights = [], []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("role"), str):
            raise RowError("invalid_messages", "each message needs a string 'role' and a string 'content'")
        # every other key travels to the template as the row gives it (a template may read `name`)
        message = {key: value for key, value in item.items() if key != "loss_weight"}
        calls = item.get("tool_calls")
        if calls:
            if item["role"] != "assistant" or not isinstance(calls, list):
                raise RowError("invalid_messages", f"message {i}: tool_calls must be a list on an assistant message")
            message["tool_calls"] = [_openai_call(call, i) for call in calls]
        message["content"] = _text(item.get("content"), i, may_be_null=bool(calls))
        messages.append(message)
        weights.append(_weight(item, i))
    return messages, weights


def read_sharegpt(values: dict, settings: dict) -> tuple[list[dict], list[int | None]]:
    tags = settings["tags"]
    role_tag, content_tag = tags["role_tag"], tags["content_tag"]
    roles = {
        tags["user_tag"]: "user",
        tags["assistant_tag"]: "assistant",
        tags["system_tag"]: "system",
        tags["function_tag"]: "function_call",
        tags["observation_tag"]: "tool",
    }
    turns = _message_list(values, settings["messages_column"])
    messages: list[dict] = []
    weights: list[int | None] = []
    system = _text_column(values, settings["columns"].get("system"))
    first = turns[0] if isinstance(turns[0], dict) else {}
    if system and first.get(role_tag) != tags["system_tag"]:  # a system turn in the conversation wins
        messages.append({"role": "system", "content": system})
        weights.append(None)
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get(role_tag) not in roles:
            found = turn.get(role_tag) if isinstance(turn, dict) else turn
            raise RowError(
                "invalid_messages", f"turn {i}: {role_tag!r} is {found!r}, not one of {', '.join(map(repr, roles))}"
            )
        content = turn.get(content_tag)
        if not isinstance(content, str):
            raise RowError("invalid_messages", f"turn {i}: {content_tag!r} must be text")
        role = roles[turn[role_tag]]
        if role == "function_call":
            messages.append({"role": "assistant", "content": "", "tool_calls": _calls_from_text(content, i)})
        else:
            messages.append({"role": role, "content": content})
        weights.append(_weight(turn, i))
    return messages, weights


def read_alpaca(values: dict, settings: dict) -> tuple[list[dict], list[int | None]]:
    columns = settings["columns"]
    for key in ("prompt", "response"):
        if columns[key] not in values:
            raise RowError("missing_column", columns[key])
    response = _text_column(values, columns["response"])
    if response is None:
        raise RowError("empty", f"column {columns['response']!r} is null")
    # LLaMA-Factory's rule: instruction, then input on the next line, each only when not empty
    user = "\n".join(
        part for part in (_text_column(values, columns["prompt"]), _text_column(values, columns.get("query"))) if part
    )
    if not user:
        raise RowError("empty", f"columns {columns['prompt']!r} and {columns.get('query')!r} are both empty")
    messages = []
    system = _text_column(values, columns.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    for i, pair in enumerate(_history(values, columns.get("history"))):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise RowError("invalid_messages", f"history item {i} is not a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
    return messages, [None] * len(messages)


READERS: dict[str, Callable[[dict, dict], tuple[list[dict], list[int | None]]]] = {
    "openai": read_openai,
    "sharegpt": read_sharegpt,
    "alpaca": read_alpaca,
}


# --------------------------------------------------------------------------- fields


def _json_text(value: Any, column: str) -> Any:
    """Lists kept as JSON text (CSV files, some parquet files) read back; other values as they are."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise RowError("invalid_messages", f"column {column!r} is text that is not JSON") from err


def _message_list(values: dict, column: str) -> list:
    if column not in values:
        raise RowError("missing_column", column)
    items = _json_text(values[column], column)
    if items is None or (isinstance(items, list) and not items):
        raise RowError("empty", f"column {column!r} has no messages")
    if not isinstance(items, list):
        raise RowError("invalid_messages", f"column {column!r} is not a list of messages")
    return items


def _text_column(values: dict, column: str | None) -> str | None:
    """A text column's value; None when the dataset names no such column, the row lacks it or it is null."""
    if not column or values.get(column) is None:
        return None
    if not isinstance(values[column], str):
        raise RowError("invalid_messages", f"column {column!r} is not text")
    return values[column]


def _history(values: dict, column: str | None) -> list:
    history = _json_text(values.get(column), column) if column else None
    if history is None:
        return []
    if not isinstance(history, list):
        raise RowError("invalid_messages", f"column {column!r} is not a list of [user, assistant] pairs")
    return history


def _text(content: Any, i: int, may_be_null: bool) -> str:
    """A message's content: a string, or text parts joined as templates render them (no separator)."""
    if isinstance(content, str):
        return content
    if content is None and may_be_null:
        return ""
    if isinstance(content, list) and content:
        parts = [
            p.get("text", p.get("value")) if isinstance(p, dict) and p.get("type", "text") == "text" else None
            for p in content
        ]
        if all(isinstance(p, str) for p in parts):
            return "".join(parts)
    raise RowError(
        "invalid_messages", f"message {i}: content must be a string or a list of text parts {{type: text, text}}"
    )


def _weight(item: dict, i: int) -> int | None:
    weight = item.get("loss_weight")
    if weight is None:
        return None
    if weight not in (0, 1):
        raise RowError("invalid_messages", f"message {i}: loss_weight must be 0 or 1, not {weight!r}")
    return int(weight)


def _arguments(arguments: Any, i: int) -> dict:
    """A call's arguments as a mapping (templates serialize them with tojson); JSON text is read."""
    if arguments is None:
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            arguments = None
    if not isinstance(arguments, dict):
        raise RowError("invalid_messages", f"message {i}: a tool call's arguments must be a JSON object")
    return arguments


def _openai_call(call: Any, i: int) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise RowError("invalid_messages", f"message {i}: a tool call needs function.name")
    out: dict[str, Any] = {
        "type": "function",
        "function": {"name": function["name"], "arguments": _arguments(function.get("arguments"), i)},
    }
    if "id" in call:
        out["id"] = call["id"]
    return out


def _calls_from_text(text: str, i: int) -> list[dict]:
    """A ShareGPT function_call turn: {"name", "arguments"} as JSON text, or a list of them."""
    try:
        calls = json.loads(text)
    except json.JSONDecodeError:
        calls = None
    calls = [calls] if isinstance(calls, dict) else calls
    if (
        not calls
        or not isinstance(calls, list)
        or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls)
    ):
        raise RowError(
            "invalid_messages", f"turn {i}: a function call must be JSON {{name, arguments}} or a list of them"
        )
    return [
        {"type": "function", "function": {"name": c["name"], "arguments": _arguments(c.get("arguments"), i)}}
        for c in calls
    ]


def _tools(values: dict, column: str | None) -> list[dict] | None:
    """The tools column as apply_chat_template takes it: [{type: function, function: {name, ...}}]."""
    if not column:
        return None
    tools = _json_text(values.get(column), column)
    if not tools:
        return None
    tools = [tools] if isinstance(tools, dict) else tools
    if not isinstance(tools, list) or not all(isinstance(t, dict) and ("function" in t or "name" in t) for t in tools):
        raise RowError(
            "invalid_messages", f"column {column!r} is not a list of tool schemas {{name, description, parameters}}"
        )
    # LLaMA-Factory lists bare function schemas; transformers documents them wrapped
    return [t if "function" in t else {"type": "function", "function": t} for t in tools]


# --------------------------------------------------------------------------- checks at config time


def row_fits(row: dict, settings: dict) -> bool:
    """Whether a row has the shape its format reads (empty answers and the like still fit)."""
    try:
        conversation(row, settings)
    except RowError as err:
        return err.reason not in ("missing_column", "invalid_messages")
    return True


def row_uses_tools(row: dict, settings: dict) -> bool:
    try:
        return conversation(row, settings).uses_tools
    except RowError:
        return False


def guess_format(row: dict) -> tuple[str, str | None, str] | None:
    """(format, its conversation column, what shows it) for a row whose shape names a format, else None."""
    for column, value in row.items():
        try:
            items = _json_text(value, column) if isinstance(value, str) and value.lstrip().startswith("[") else value
        except RowError:
            continue
        if not isinstance(items, list) or not items or not all(isinstance(x, dict) for x in items):
            continue
        if all("from" in x and "value" in x for x in items):
            return "sharegpt", column, f"column {column!r} is a list of {{from, value}}"
        if all("role" in x for x in items):
            return "openai", column, f"column {column!r} is a list of {{role, content}}"
    if "instruction" in row and "output" in row:
        return "alpaca", None, "it has columns 'instruction' and 'output'"
    return None
