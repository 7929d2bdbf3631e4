"""The statistics of a tokenized split (stats.json): lengths, rows dropped by reason, and
the warnings and errors of splits that lost rows. Standard library only.

A split that loses more than DROPPED_SHARE_WARNING of its rows gets a warning
(the tokenize log, stats.json's `warnings`, and the report's `lossy data`
column); a split with no usable row, or none at all, is an error that names the
config key to change.
"""

from __future__ import annotations

import math
from collections import Counter

from .errors import FtflowError

# What to change when a reason drops many rows: the tokenize log and stats.json's warnings say it.
DROP_FIXES = {
    "empty": "fill or remove the rows with nothing to learn",
    "missing_column": "name the right columns (template, messages_column, text_column) or map the format with `format:`",
    "not_utf8": "re-save the file as UTF-8",
    "invalid_json": "fix the lines that are not JSON objects",
    "invalid_messages": "map the format with `format:` (messages must be a list of {role, content})",
    "template_error": "fix the template, or map the format with `format:`",
    "over_length": "raise max_length or set truncation: truncate",
    "no_label_tokens": "raise max_length (truncation cut the whole answer)",
}
# A split that loses more than this share of its rows is a warning in the log, stats.json and the report.
DROPPED_SHARE_WARNING = 0.05


def length_stats(lengths: list[int]) -> dict:
    if not lengths:
        return {"count": 0}
    ordered = sorted(lengths)

    def percentile(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(math.ceil(q * len(ordered))) - 1)]

    edges = [0, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 1 << 30]
    histogram = {}
    for lo, hi in zip(edges, edges[1:]):
        count = sum(1 for n in ordered if lo < n <= hi)
        if count:
            histogram[f"{lo + 1}-{hi if hi < 1 << 30 else 'inf'}"] = count
    return {
        "count": len(ordered),
        "min": ordered[0],
        "mean": round(sum(ordered) / len(ordered), 2),
        "p50": percentile(0.5),
        "p90": percentile(0.9),
        "p99": percentile(0.99),
        "max": ordered[-1],
        "histogram": histogram,
    }


def drop_counts(encoded) -> tuple[Counter, dict, int]:
    """(rows dropped by reason, the first dropped row of each reason, the longest over_length row's tokens)."""
    dropped: Counter = Counter()
    first: dict[str, dict] = {}
    longest = 0
    for where, drop, detail in zip(encoded["where"], encoded["drop"], encoded["detail"]):
        if drop:
            dropped[drop] += 1
            first.setdefault(drop, {"row": where, "detail": detail})
            if drop == "over_length":  # the detail is "<tokens> > <max_length> tokens" (Encoder._finish)
                longest = max(longest, int(detail.split(" > ", 1)[0]))
    return dropped, first, longest


def drop_warning(name: str, split: str, split_stats: dict, max_length: int) -> dict | None:
    """The warning of a split that lost more than DROPPED_SHARE_WARNING of its rows, or None.

    It names the split, the share, the reasons by count and what to change, so
    that a fifth of the data lost to max_length is never silent.
    """
    rows_in, dropped = split_stats["rows_in"], split_stats["dropped"]
    lost = sum(dropped.values())
    if not rows_in or lost / rows_in <= DROPPED_SHARE_WARNING:
        return None
    reasons = dict(Counter(dropped).most_common())
    fixes = []
    for reason in reasons:
        fix = DROP_FIXES.get(reason, "see first_dropped in stats.json")
        if reason == "over_length":
            longest = split_stats.get("longest_dropped")
            longest_text = f"; the longest dropped row has {longest} tokens" if longest else ""
            fix = f"raise max_length (now {max_length}{longest_text}) or set truncation: truncate"
        if fix not in fixes:
            fixes.append(fix)
    share = lost / rows_in
    counts = ", ".join(f"{n} {reason}" for reason, n in reasons.items())
    return {
        "split": split,
        "share": round(share, 4),
        "dropped": lost,
        "rows_in": rows_in,
        "reasons": reasons,
        "fix": "; ".join(fixes),
        "message": f"datasets.{name}: {share:.0%} of the {split} rows dropped ({lost} of {rows_in}: {counts}); "
        + "; ".join(fixes),
    }


def unusable_split_error(name: str, split: str, dropped: Counter, first: dict) -> FtflowError:
    reason, count = dropped.most_common(1)[0]
    example = first[reason]
    what = (
        f"column {example['detail']!r} is missing" if reason == "missing_column" else f"{reason}: {example['detail']}"
    )
    others = ", ".join(f"{n} x {r}" for r, n in dropped.most_common()[1:])
    return FtflowError(
        f"datasets.{name}: no row of the {split} split can be used; {count} x {reason}"
        + (f" (and {others})" if others else "")
        + f"; e.g. {example['row']}: {what}"
    )


def empty_split_message(spec: dict, split: str) -> str:
    """A split the source gives without a row, named by the config key that gives it its rows."""
    path = f"datasets.{spec['dataset']}"
    if isinstance(spec["source"], dict):
        path += f".source.{split}"
    elif (spec.get("source_options") or {}).get("hub_splits"):
        path += f".hub_splits.{split}"
    else:
        path += ".source"
    if split == "train":
        return f"{path}: the train split has no rows (empty files, or only blank lines)"
    return (
        f"{path}: the {split} split has no rows; give it rows, or leave it out of the source "
        f"so that `splits` cuts it from train"
    )
