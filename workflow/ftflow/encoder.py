"""Rows -> token ids and labels, for each kind: the tokenize job's Encoder.

  text         a column of raw text (data.py joins documents and cuts them into blocks)
  instruction  a Python format template over the row's columns; the completion (the text
               from the last placeholder on) carries the labels (`loss_on: completion`, or all)
  chat         the row read in its format (formats.py: openai, sharegpt, alpaca) as a
               conversation, rendered with the chat template (with `tools=` when the row has
               tools); the messages formats.py marks trainable carry the labels (`loss_on:
               assistant`, or all)

The chat label mask needs no generation markers in the template: each trainable turn is
found in the rendered text itself. An assistant turn is the text the chat gains from its
generation prompt to the turn's end; where the template renders earlier turns differently
(Qwen3 drops their reasoning), its content is searched for instead (a tool call, which
the template writes itself, is found by rendering the chat with a marker in its place),
followed by the template's end of turn. Labels are -100 wherever the loss must not look.
"""

from __future__ import annotations

import os

from .encoding import DEFAULT_LOSS_ON, IGNORE, template_columns
from .errors import FtflowError, RowError
from .formats import Conversation, conversation, settings_of, template_supports_tools
from .sources import SourceRow

# Stands in for a tool call when the template renders the chat around it (no template writes it).
CALL_MARKER = "\u00a7ftflow-turn\u00a7"


class Encoder:
    """Rows -> token ids and labels (and, for eval, the prompt ids and the reference)."""

    def __init__(self, tokenizer, kind: str, encoding: dict, max_length: int, dataset: str = "dataset"):
        self.tok = tokenizer
        self.kind = kind
        self.name = dataset
        self.max_length = max_length
        self.loss_on = encoding.get("loss_on") or DEFAULT_LOSS_ON[kind]
        self.truncate = encoding.get("truncation", "drop") == "truncate"
        if kind == "instruction":
            self.prompt_t, self.completion_t = encoding["prompt"], encoding["completion"]
            self.prompt_columns = template_columns(self.prompt_t)
            self.completion_columns = template_columns(self.completion_t)
        elif kind == "chat":
            self.format = settings_of(encoding)
            self.chat_template = encoding.get("chat_template") or getattr(self.tok, "chat_template", None)
            if not self.chat_template:
                raise FtflowError(
                    f"datasets.{dataset}.chat_template: the tokenizer has no chat template; set "
                    f"datasets.{dataset}.chat_template (or models.<name>.chat_template) to a Jinja template or a file"
                )
            if not self.tok.is_fast:
                raise FtflowError(
                    f"datasets.{dataset}: chat labels need a fast tokenizer (character offsets); this one is not"
                )
            self.tools_supported = template_supports_tools(self.chat_template)
            self.turn_end = self._probe_turn_end()
        elif kind == "text":
            self.text_column = encoding.get("text_column", "text")
        else:
            raise FtflowError(f"datasets.{dataset}.kind: unknown kind {kind!r}")

    # -- chat
    def _render(self, messages, tools=None, add_generation_prompt=False) -> str:
        extra = {"tools": tools} if tools else {}
        return self.tok.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **extra,
        )

    def _probe_turn_end(self) -> str:
        """What the template writes after an assistant message (e.g. '<|im_end|>\\n')."""
        probe = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "PONG-7"}]
        text = self._render(probe)
        return text[text.rfind("PONG-7") + len("PONG-7") :]

    def _trainable_spans(self, chat: Conversation) -> tuple[str, list[tuple[int, int]]]:
        """The rendered chat and the character spans of its trainable turns (content + turn end)."""
        messages, tools = chat.messages, chat.tools
        text = self._render(messages, tools)
        spans = []
        search = 0
        for i, message in enumerate(messages):
            if not chat.trainable[i]:
                continue
            if message["role"] == "assistant" and i:
                prefix = self._render(messages[:i], tools, add_generation_prompt=True)
                upto = self._render(messages[: i + 1], tools)
                if text.startswith(upto) and upto.startswith(prefix) and len(upto) > len(prefix):
                    spans.append((len(prefix), len(upto)))
                    search = len(upto)
                    continue
            # Templates that render earlier turns differently (Qwen3 drops the reasoning of
            # all but the last turn) break the prefix property: find the turn itself, then
            # the template's end of turn.
            if message.get("tool_calls"):
                start, end = self._marked_span(text, chat, i)
            else:
                start = text.find(message["content"], search)
                if start < 0:
                    raise RowError("template_error", f"{message['role']} message {i} is not in the rendered chat")
                end = start + len(message["content"])
            if self.turn_end and text.startswith(self.turn_end, end):
                end += len(self.turn_end)
            spans.append((start, end))
            search = end
        return text, spans

    def _marked_span(self, text: str, chat: Conversation, i: int) -> tuple[int, int]:
        """Where message i (a tool call, which the template writes itself) is in `text`: the part
        that differs from the same chat rendered with a marker in that message's place."""
        marked = list(chat.messages)
        marked[i] = {"role": marked[i]["role"], "content": CALL_MARKER}
        other = self._render(marked, chat.tools)
        start = len(os.path.commonprefix([text, other]))
        tail = min(len(os.path.commonprefix([text[::-1], other[::-1]])), len(text) - start, len(other) - start)
        end = len(text) - tail
        if end <= start or CALL_MARKER not in other[start : len(other) - tail]:
            raise RowError("template_error", f"the tool call of message {i} is not in the rendered chat")
        return start, end

    def _render_chat(self, values: dict, where: str) -> dict:
        chat = conversation(values, self.format)
        if chat.uses_tools and not self.tools_supported:
            raise FtflowError(
                f"datasets.{self.name}: {where} has tools or tool calls, but the chat template never mentions "
                f"tools or tool_calls, so it cannot render them; set datasets.{self.name}.chat_template (or "
                "models.<name>.chat_template) to a template with tool support, e.g. the model family's own"
            )
        messages = chat.messages
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        try:
            text, spans = self._trainable_spans(chat)
            prompt = self._render(messages[:last], chat.tools, add_generation_prompt=True)
            reference = messages[last]["content"]
            if messages[last].get("tool_calls"):  # the answer to generate is the call as the template writes it
                start, end = self._marked_span(text, chat, last)
                reference = text[start:end]
        except RowError:
            raise
        except Exception as err:  # jinja errors raised by the template itself
            raise RowError("template_error", str(err).splitlines()[0] if str(err) else type(err).__name__) from err
        return {"text": text, "spans": spans, "prompt": prompt, "reference": reference}

    # -- instruction
    def _render_instruction(self, values: dict) -> dict:
        for column in self.prompt_columns + self.completion_columns:
            if column not in values:
                raise RowError("missing_column", column)
            if values[column] is None:
                raise RowError("empty", f"column {column!r} is null")
        for column in self.completion_columns:
            if isinstance(values[column], str) and not values[column].strip():
                raise RowError("empty", f"column {column!r} is empty")
        try:
            prompt = self.prompt_t.format(**values)
            completion = self.completion_t.format(**values)
        except (KeyError, IndexError, ValueError, TypeError, AttributeError) as err:
            raise RowError("template_error", f"{type(err).__name__}: {err}") from err
        return {"prompt": prompt, "completion": completion}

    # -- text
    def _render_text(self, values: dict) -> dict:
        if self.text_column not in values:
            raise RowError("missing_column", self.text_column)
        text = values[self.text_column]
        if not isinstance(text, str) or not text.strip():
            raise RowError("empty", f"column {self.text_column!r} is empty")
        return {"text": text}

    def render(self, values: dict, where: str = "row 1") -> dict:
        if self.kind == "chat":
            return self._render_chat(values, where)
        return {"instruction": self._render_instruction, "text": self._render_text}[self.kind](values)

    # -- tokens, a batch at a time (the fast tokenizer encodes a list in one call)
    def _tokenize(self, rendered: list[dict]) -> list[dict]:
        tok = self.tok
        if self.kind == "text":
            bos = [tok.bos_token_id] if tok.bos_token_id is not None and getattr(tok, "add_bos_token", False) else []
            eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
            ids = tok([r["text"] for r in rendered], add_special_tokens=False)["input_ids"]
            return [{"input_ids": bos + x + eos} for x in ids]
        if self.kind == "instruction":
            prompts = tok([r["prompt"] for r in rendered], add_special_tokens=True)["input_ids"]
            completions = tok([r["completion"] for r in rendered], add_special_tokens=False)["input_ids"]
            eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
            records = []
            for r, p, c in zip(rendered, prompts, completions):
                c = c + eos
                labels = p + c if self.loss_on == "all" else [IGNORE] * len(p) + c
                records.append({"input_ids": p + c, "labels": labels, "prompt_ids": p, "reference": r["completion"]})
            return records
        enc = tok([r["text"] for r in rendered], add_special_tokens=False, return_offsets_mapping=True)
        prompts = tok([r["prompt"] for r in rendered], add_special_tokens=False)["input_ids"]
        records = []
        for r, ids, offsets, p in zip(rendered, enc["input_ids"], enc["offset_mapping"], prompts):
            if self.loss_on == "all":
                labels = list(ids)
            else:
                # A token is labelled when any of its characters is in a trainable span:
                # every character of an answer is learned, also when a merge joins the
                # answer's first character to the template text before it.
                labels = [
                    t if end > start and any(start < e and s < end for s, e in r["spans"]) else IGNORE
                    for t, (start, end) in zip(ids, offsets)
                ]
            records.append({"input_ids": ids, "labels": labels, "prompt_ids": p, "reference": r["reference"]})
        return records

    def _finish(self, record: dict) -> dict:
        record["truncated"] = False
        if len(record["input_ids"]) > self.max_length:
            if not self.truncate:
                raise RowError("over_length", f"{len(record['input_ids'])} > {self.max_length} tokens")
            record["input_ids"] = record["input_ids"][: self.max_length]
            record["labels"] = record["labels"][: self.max_length]
            record["truncated"] = True
        # the first label of an example is never learned (nothing predicts it)
        if not any(label != IGNORE for label in record["labels"][1:]):
            raise RowError("no_label_tokens", "no token after the first carries a label")
        return record

    def encode_rows(self, rows: list[SourceRow]) -> list[dict | RowError]:
        """One result per row, in order: a record, or the RowError that drops it."""
        results: list[dict | RowError | None] = [None] * len(rows)
        rendered, positions = [], []
        for i, row in enumerate(rows):
            if row.problem:
                results[i] = RowError(row.problem, row.detail)
                continue
            try:
                rendered.append(self.render(row.values, row.where))
                positions.append(i)
            except RowError as err:
                results[i] = err
        if rendered:
            for i, record in zip(positions, self._tokenize(rendered)):
                if self.kind == "text":
                    results[i] = record
                    continue
                try:
                    results[i] = self._finish(record)
                except RowError as err:
                    results[i] = err
        return results

    def encode(self, values: dict) -> dict:
        """One row (a test and debugging convenience); raises RowError for a dropped row."""
        result = self.encode_rows([SourceRow("row 1", values)])[0]
        if isinstance(result, RowError):
            raise result
        return result
