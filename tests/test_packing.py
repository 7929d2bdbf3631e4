"""Packed rows keep examples apart: logits of a packed batch equal each example run alone."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ftflow.packing import PACKED_ATTENTION, packing_collator


def tiny_llama(attention: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation=attention,
        use_cache=False,
    )
    return LlamaForCausalLM(config)


EXAMPLES = [[5, 17, 23, 42, 8], [9, 3], [77, 12, 64, 31, 2, 7, 19], [44, 45, 46]]


@pytest.mark.parametrize("attention", [PACKED_ATTENTION, "sdpa", "eager"])
def test_packed_logits_equal_separate_runs(attention):
    model = tiny_llama(attention)
    model.train()  # the mode the trainer uses (no dropout configured, so outputs are deterministic)
    batch = packing_collator()([{"input_ids": ids, "labels": ids} for ids in EXAMPLES])
    assert batch["input_ids"].shape == (1, sum(map(len, EXAMPLES)))  # one row, no padding
    assert batch["position_ids"][0].tolist() == [p for ids in EXAMPLES for p in range(len(ids))]
    labels = batch.pop("labels")[0].tolist()
    starts = [sum(map(len, EXAMPLES[:i])) for i in range(len(EXAMPLES))]
    assert all(labels[s] == -100 for s in starts), "no example learns to predict its first token from the previous one"
    packed = model(**batch).logits[0]
    for ids, start in zip(EXAMPLES, starts):
        alone = model(input_ids=torch.tensor([ids])).logits[0]
        torch.testing.assert_close(packed[start : start + len(ids)], alone, rtol=1e-4, atol=1e-5)


def test_packed_attention_differs_from_unmasked_concatenation():
    """The check above can fail: without restarting positions the examples do see each other."""
    model = tiny_llama(PACKED_ATTENTION)
    flat = torch.tensor([[t for ids in EXAMPLES for t in ids]])
    joined = model(input_ids=flat).logits[0]
    start = len(EXAMPLES[0])
    alone = model(input_ids=torch.tensor([EXAMPLES[1]])).logits[0]
    assert not torch.allclose(joined[start : start + len(EXAMPLES[1])], alone, atol=1e-3)


def test_packed_attention_gradients_match_separate_runs():
    model = tiny_llama(PACKED_ATTENTION)
    batch = packing_collator()([{"input_ids": ids, "labels": ids} for ids in EXAMPLES])
    loss_packed = model(**batch).loss
    grads_packed = torch.autograd.grad(loss_packed, model.model.layers[0].self_attn.q_proj.weight)[0]
    total, count = 0.0, 0
    for ids in EXAMPLES:
        out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids]))
        n = len(ids) - 1
        total = total + out.loss * n
        count += n
    grads_alone = torch.autograd.grad(total / count, model.model.layers[0].self_attn.q_proj.weight)[0]
    torch.testing.assert_close(grads_packed, grads_alone, rtol=1e-4, atol=1e-6)
