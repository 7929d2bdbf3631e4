"""Mixtures: several tokenized datasets combined into one training split, in the train job.

A stage that lists datasets (`dataset: [general-zh, my-sft]`) trains on all of
them. Each member is tokenized on its own (its own data_id, shared with every
experiment that uses it); the train job combines the members' train splits as
the stage's `mix` says, with its seed, so a re-run sees the same rows:

  concat      each member gives round(weight x its train rows): below 1 a seeded
              subset, above 1 every row repeated whole times plus a seeded subset
              for the fraction; the parts are concatenated in list order (the
              trainer shuffles them)
  interleave  `datasets.interleave_datasets`: each row comes from a member drawn
              with probability weight / sum of weights, each member's rows in a
              seeded order, until the first member with a weight above 0 has given
              all its rows (LLaMA-Factory's `interleave_under`); no row repeats

The weights' meaning for concat (specs.concat_rows) and the mixture's name
(StageSpec.data_text) are in the typed contract, which the planner reads too.
"""

from __future__ import annotations

from .specs import concat_rows

MEMBER_COLUMN = "ftflow_member"  # the member each row came from, while interleaving


def mix_train_splits(members: list, names: tuple[str, ...], data_ids: tuple[str, ...], mix: dict):
    """(one training split, the mixture's record for train_metrics.json) from the members' train splits,
    given in list order."""
    import numpy as np
    from datasets import concatenate_datasets, interleave_datasets

    members = _same_features(members)
    weights = [float(mix["weights"][name]) for name in names]
    seed = int(mix["seed"])
    # one random stream per member: adding a member leaves the others' rows as they were
    rngs = [np.random.default_rng([seed, index]) for index in range(len(members))]
    if mix["strategy"] == "concat":
        parts = [_weighted_rows(member, weight, rng) for member, weight, rng in zip(members, weights, rngs)]
        taken = [len(part) for part in parts]
        mixed = concatenate_datasets(parts)
    else:
        total = sum(weights)
        # select() keeps its index mapping in memory; shuffle() would write a cache file into
        # the shared results/data/{data_id}/ folder
        tagged = [
            member.add_column(MEMBER_COLUMN, [index] * len(member)).select(rng.permutation(len(member)))
            for index, (member, rng) in enumerate(zip(members, rngs))
        ]
        mixed = interleave_datasets(
            tagged,
            probabilities=[weight / total for weight in weights],
            seed=seed,
            stopping_strategy="first_exhausted",
        )
        counts = np.bincount(np.asarray(mixed[MEMBER_COLUMN], dtype=np.int64), minlength=len(members))
        taken = [int(count) for count in counts]
        mixed = mixed.remove_columns(MEMBER_COLUMN)
    record = {
        "strategy": mix["strategy"],
        "seed": seed,
        "rows": len(mixed),
        "members": [
            {"dataset": name, "data_id": data_id, "weight": weight, "train_rows": len(member), "rows_taken": rows}
            for name, data_id, weight, member, rows in zip(names, data_ids, weights, members, taken)
        ],
    }
    return mixed, record


def _weighted_rows(member, weight: float, rng):
    """concat's part of one member: every row `weight // 1` times, then a seeded subset for the rest."""
    rows = len(member)
    wanted = concat_rows(rows, weight)
    whole, rest = divmod(wanted, rows) if rows else (0, 0)
    extra = sorted(rng.choice(rows, size=rest, replace=False).tolist()) if rest else []
    return member.select([*range(rows)] * whole + extra)


def _same_features(members: list) -> list:
    """The members cast to the first one's column types (text blocks store int64 ids, chat and
    instruction rows int32), which concatenation and interleaving need; in memory, never a cache
    file in the shared data folder."""
    target = members[0].features
    return [member if member.features == target else member.cast(target, keep_in_memory=True) for member in members]
