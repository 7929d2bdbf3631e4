"""How a dataset's settings become tokens, as data: the settings that change the
tokens of each kind, the default loss mask, and the instruction templates.

The planner hashes exactly these settings into `data_id` and checks templates
before any job; the tokenize job applies them. Standard library only: the
planner imports it.
"""

from __future__ import annotations

import string

# Bump when a change here changes the tokens written for the same spec: it is
# part of every data_id, so cached tokenizations are redone.
# 3: chat rows in more shapes are kept (text parts, tool calls, tools), .txt files split by line.
TOKENIZATION_VERSION = 3
# The label of a position the loss must not look at (prompts, pads, packing seams):
# the ignore_index of torch's cross entropy, which the transformers collators use too.
IGNORE = -100
DEFAULT_LOSS_ON = {"text": "all", "instruction": "completion", "chat": "assistant"}
# Dataset settings that change the tokens, by kind (config.py hashes exactly these).
ENCODING_KEYS = {
    "text": ("text_column",),
    "instruction": ("prompt", "completion", "loss_on", "truncation"),
    "chat": ("messages_column", "chat_template", "loss_on", "truncation"),
}
# Chat settings that say how a row becomes a conversation (formats.py). They enter the
# encoding, all of them, only when one differs from its schema default: a spec without
# them means the openai format at its defaults, so data_ids written before formats
# existed stay the same.
CHAT_FORMAT_KEYS = ("format", "columns", "tags", "roles_to_train", "mask_history")


def template_fields(template: str) -> list[tuple[str, int]]:
    """[(column, offset of its '{' in the template)] of a format template; ValueError if malformed."""
    fields = []
    offset = 0
    for literal, name, spec, conversion in string.Formatter().parse(template):
        # parse() un-doubles '{{' and '}}' in literal text; count them as written
        offset += len(literal) + literal.count("{") + literal.count("}")
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise ValueError("use named placeholders such as {title}; positional {} and {0} have no column")
        if not name.isidentifier():
            raise ValueError(
                f"placeholder {{{name}}} is not a column name (attribute and index lookups are not supported)"
            )
        if "{" in (spec or ""):
            raise ValueError(f"placeholder {{{name}}}: nested placeholders in a format spec are not supported")
        written = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        fields.append((name, offset))
        offset += len(written)
    return fields


def template_columns(template: str) -> list[str]:
    columns = []
    for name, _ in template_fields(template):
        if name not in columns:
            columns.append(name)
    return columns


def split_template(template: str) -> tuple[str, str]:
    """(prompt, completion) templates: the completion starts at the last placeholder.

    '请创作一首古诗，主题关于{title}：\\n{content}' -> ('请创作一首古诗，主题关于{title}：\\n', '{content}')
    """
    fields = template_fields(template)
    if not fields:
        raise ValueError("the template has no {column} placeholder, so nothing in it is the completion")
    start = fields[-1][1]
    return template[:start], template[start:]
