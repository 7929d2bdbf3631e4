"""The rows a peer trains on: ftflow's own source rows, in the order of ftflow's tokenized examples.

A peer tokenizes for itself, so it gets the rows before tokenization: each
tokenized example carries `source_row` (where its row came from), and the row
is read back from the same source, split the same way. Chat rows become the
records a peer reads directly: the messages before the last assistant turn as
the prompt, that turn as the completion (TRL's conversational prompt-completion
shape; LLaMA-Factory's `messages` list in OpenAI format).
"""

from __future__ import annotations

from ..errors import FtflowError


def peer_records(data_spec: str, workdir: str, source_rows: list[str]) -> tuple[str, list[dict]]:
    """(kind, one record per example): chat {"prompt": [messages], "completion": [message]};
    instruction {"prompt": str, "completion": str}."""
    from ..atomic import read_json
    from ..formats import conversation, settings_of
    from ..sources import cut_splits, load_source

    spec = read_json(data_spec)
    kind, encoding = spec["kind"], spec["encoding"]
    if kind == "text":
        raise FtflowError(
            f"bench: dataset {spec['dataset']!r} is kind 'text'; the peer comparison needs chat or instruction rows"
        )
    rows, _ = cut_splits(load_source(spec, workdir), spec.get("splits"), spec["dataset"])
    by_source = {row.where: row.values for split in rows.values() for row in split}
    records = []
    for where in source_rows:
        values = by_source[where]
        if kind == "instruction":
            records.append(
                {"prompt": encoding["prompt"].format(**values), "completion": encoding["completion"].format(**values)}
            )
            continue
        chat = conversation(values, settings_of(encoding))
        last = max(i for i, m in enumerate(chat.messages) if m["role"] == "assistant")
        trained = [i for i, flag in enumerate(chat.trainable) if flag]
        if trained != [last] or chat.uses_tools:
            raise FtflowError(
                f"bench: dataset {spec['dataset']!r} has rows that train on turns other than the last assistant "
                "message (or use tools); the peer comparison supports one trained answer per row"
            )
        records.append({"prompt": chat.messages[:last], "completion": [chat.messages[last]]})
    return kind, records


def label_positions(input_ids: list[int], labels: list[int]) -> list[int]:
    """The positions whose token carries a label (a model predicts it from the position before)."""
    return [i for i, label in enumerate(labels) if label != -100 and i > 0]


def compare_labels(ours: list[dict], theirs: list[dict], show: int = 3) -> dict:
    """How many examples tokenize to the same ids and label the same positions on both sides,
    and the first differences. Each item: {"input_ids", "labels"} of one example."""
    same_ids = same_labels = 0
    differences = []
    for index, (a, b) in enumerate(zip(ours, theirs)):
        ids_equal = list(a["input_ids"]) == list(b["input_ids"])
        pa, pb = label_positions(a["input_ids"], a["labels"]), label_positions(b["input_ids"], b["labels"])
        same_ids += ids_equal
        same_labels += ids_equal and pa == pb
        if (not ids_equal or pa != pb) and len(differences) < show:
            differences.append(
                {
                    "example": index,
                    "ids_equal": ids_equal,
                    "lengths": [len(a["input_ids"]), len(b["input_ids"])],
                    "only_ftflow": sorted(set(pa) - set(pb))[:20],
                    "only_peer": sorted(set(pb) - set(pa))[:20],
                }
            )
    return {
        "examples": min(len(ours), len(theirs)),
        "identical_ids": same_ids,
        "identical_labels": same_labels,
        "differences": differences,
    }
