"""A packed row that carries its examples' shared prefix once: every example computes what it would alone."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from ftflow.evaluation import dataset_loss, packed_batches
from ftflow.packing import MIN_SHARED_PREFIX, PACKED_ATTENTION, SHARED_PREFIX, shared_prefix_length, shared_prefix_row
from helpers import tiny_llama

PREFIX = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]  # e.g. a system prompt, unlabelled
OWN = [[30, 31, 32, 33, 34], [40, 41], [50, 51, 52, 53, 54, 55, 56], [60, 61, 62]]


def examples(prompt: int = 1) -> list[dict]:
    """PREFIX + own tokens; the first `prompt` own tokens are unlabelled, the rest are answers."""
    rows = []
    for own in OWN:
        ids = PREFIX + own
        rows.append({"input_ids": ids, "labels": [-100] * (len(PREFIX) + prompt) + ids[len(PREFIX) + prompt :]})
    return rows


def test_the_prefix_stops_before_the_first_label_and_leaves_each_example_a_token():
    assert shared_prefix_length(examples()) == len(PREFIX)
    early = examples()
    early[2]["labels"][len(PREFIX)] = early[2]["input_ids"][len(PREFIX)]  # a label right after the prefix
    assert shared_prefix_length(early) == len(PREFIX) - 1  # the prefix's last logit would predict it
    inside = examples()
    inside[1]["labels"][4] = inside[1]["input_ids"][4]
    assert shared_prefix_length(inside) == 0  # 3 tokens: under MIN_SHARED_PREFIX
    assert MIN_SHARED_PREFIX > 3
    assert shared_prefix_length(examples()[:1]) == 0  # nothing to share with
    short = examples() + [{"input_ids": PREFIX[:9], "labels": [-100] * 9}]
    assert shared_prefix_length(short) == 8  # the shortest keeps one token of its own


def test_the_row_layout():
    row = shared_prefix_row(examples())
    n = len(PREFIX)
    assert row[SHARED_PREFIX] == n
    assert row["input_ids"][0].tolist() == PREFIX + sum(OWN, [])
    assert row["position_ids"][0].tolist() == list(range(n)) + [p for own in OWN for p in range(n, n + len(own))]
    assert row["cu_seq_lens_q"].tolist() == [0, n, n + 5, n + 7, n + 14, n + 17]
    labels = row["labels"][0].tolist()
    assert labels[: n + 1] == [-100] * (n + 1)
    assert sum(label != -100 for label in labels) == sum(len(own) - 1 for own in OWN)


@torch.no_grad()
def test_logits_equal_each_example_alone():
    model = tiny_llama(PACKED_ATTENTION, use_cache=False).eval()
    row = shared_prefix_row(examples())
    row.pop("labels")
    logits = model(**row).logits[0]
    start = len(PREFIX)
    for example, own in zip(examples(), OWN):
        alone = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
        torch.testing.assert_close(logits[start : start + len(own)], alone[len(PREFIX) :], rtol=1e-4, atol=1e-5)
        start += len(own)


@torch.no_grad()
def test_without_ftflow_packed_attention_the_examples_would_not_see_the_prefix():
    """Why only ftflow_packed reads the row: SDPA treats its segments as unrelated sequences."""
    model = tiny_llama("sdpa", use_cache=False).eval()
    row = shared_prefix_row(examples())
    row.pop("labels")
    logits = model(**row).logits[0]
    # the first example continues the prefix's positions, so SDPA's mask joins them; the second restarts
    alone = model(input_ids=torch.tensor([examples()[1]["input_ids"]])).logits[0]
    start = len(PREFIX) + len(OWN[0])
    assert not torch.allclose(logits[start : start + len(OWN[1])], alone[len(PREFIX) :], atol=1e-3)


def test_gradients_equal_packing_each_example_whole():
    model = tiny_llama(PACKED_ATTENTION, use_cache=False).train()
    weight = model.model.layers[0].self_attn.k_proj.weight

    def loss_and_grad(row):
        loss = model(**row).loss
        return loss, torch.autograd.grad(loss, weight)[0]

    from ftflow.packing import packing_collator

    shared_loss, shared_grad = loss_and_grad(shared_prefix_row(examples()))
    whole_loss, whole_grad = loss_and_grad(packing_collator()(examples()))
    torch.testing.assert_close(shared_loss, whole_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shared_grad, whole_grad, rtol=1e-4, atol=1e-6)
    assert shared_grad.abs().sum() > 0


@pytest.mark.parametrize("max_tokens", [4096, 40])  # one row, and several (40 tokens force a split)
def test_eval_loss_is_the_same_with_the_prefix_shared(max_tokens):
    model = tiny_llama(PACKED_ATTENTION, use_cache=False).eval()
    data = Dataset.from_list(examples())
    rows = list(packed_batches(data, max_tokens, share_prefix=True))
    assert all(SHARED_PREFIX in row for row in rows if row["cu_seq_lens_q"].numel() > 2)
    assert any(SHARED_PREFIX in row for row in rows)
    shared = dataset_loss(model, data, "cpu", max_tokens=max_tokens)
    sdpa = dataset_loss(tiny_llama("sdpa", use_cache=False).eval(), data, "cpu", max_tokens=max_tokens)  # no sharing
    assert shared["eval_label_tokens"] == sdpa["eval_label_tokens"] == sum(len(own) - 1 for own in OWN)
    assert shared["eval_loss"] == pytest.approx(sdpa["eval_loss"], rel=1e-5)
