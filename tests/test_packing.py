"""Packed rows keep examples apart: logits of a packed batch equal each example run alone."""

from __future__ import annotations

import pytest
import torch

from ftflow.packing import PACKED_ATTENTION, packing_collator
from helpers import tiny_llama

EXAMPLES = [[5, 17, 23, 42, 8], [9, 3], [77, 12, 64, 31, 2, 7, 19], [44, 45, 46]]


@pytest.mark.parametrize("attention", [PACKED_ATTENTION, "sdpa", "eager"])
def test_packed_logits_equal_separate_runs(attention):
    model = tiny_llama(attention, use_cache=False)
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
    model = tiny_llama(PACKED_ATTENTION, use_cache=False)
    flat = torch.tensor([[t for ids in EXAMPLES for t in ids]])
    joined = model(input_ids=flat).logits[0]
    start = len(EXAMPLES[0])
    alone = model(input_ids=torch.tensor([EXAMPLES[1]])).logits[0]
    assert not torch.allclose(joined[start : start + len(EXAMPLES[1])], alone, atol=1e-3)


def test_packed_attention_gradients_match_separate_runs():
    model = tiny_llama(PACKED_ATTENTION, use_cache=False)
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


# --------------------------------------------------------------------------- packing: false


def word_tokenizer():
    """A 101-word tokenizer with a pad token: all the padding collator needs, built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(101)}, unk_token="t1"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", eos_token="t2")


def features(examples):
    return [{"input_ids": ids, "labels": ids, "length": len(ids)} for ids in examples]


@pytest.mark.parametrize("attention", [PACKED_ATTENTION, "sdpa", "eager"])
def test_padded_batch_logits_equal_separate_runs(attention):
    from ftflow.packing import padding_collator

    model = tiny_llama(attention, use_cache=False)
    model.train()
    batch = padding_collator(word_tokenizer())(features(EXAMPLES))
    width = max(map(len, EXAMPLES))
    assert batch["input_ids"].shape == (len(EXAMPLES), 8), "padded to the longest row, rounded up to a multiple of 8"
    assert batch["input_ids"].shape[1] - width < 8
    for row, ids in enumerate(EXAMPLES):
        assert batch["attention_mask"][row].tolist() == [1] * len(ids) + [0] * (8 - len(ids))
        assert batch["labels"][row].tolist() == ids + [-100] * (8 - len(ids)), "pads carry no label"
    padded = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    for row, ids in enumerate(EXAMPLES):
        alone = model(input_ids=torch.tensor([ids])).logits[0]
        torch.testing.assert_close(padded[row, : len(ids)], alone, rtol=1e-4, atol=1e-5)


def trainer_for(stage_training: dict, packing: bool, tmp_path, dataset=None):
    from datasets import Dataset

    from ftflow.packing import padding_collator
    from ftflow.trainer import FtflowTrainer, build_training_arguments

    training = {"per_device_train_batch_size": 8, "seed": 42, "max_steps": 1, **stage_training}
    args = build_training_arguments(
        training, packing, str(tmp_path / "out"), has_eval=False, run_name="t/s", device="cpu"
    )
    tokenizer = word_tokenizer()
    data = dataset if dataset is not None else Dataset.from_list(features(EXAMPLES))
    return FtflowTrainer(
        model=tiny_llama(PACKED_ATTENTION, use_cache=False),
        args=args,
        data_collator=packing_collator() if packing else padding_collator(tokenizer),
        train_dataset=data,
        processing_class=tokenizer,
    )


def test_padded_and_packed_losses_agree(tmp_path):
    """Both paths average the loss over the same labelled tokens: each example's all but the first."""
    packed_trainer = trainer_for({}, True, tmp_path)
    padded_trainer = trainer_for({}, False, tmp_path)
    model = packed_trainer.model
    padded_trainer.model = model
    packed = packed_trainer.compute_loss(model, packing_collator()(features(EXAMPLES)))
    padded = padded_trainer.compute_loss(model, padded_trainer.data_collator(features(EXAMPLES)))
    total = sum(
        model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss * (len(ids) - 1) for ids in EXAMPLES
    )
    expected = total / sum(len(ids) - 1 for ids in EXAMPLES)
    torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(padded, expected, rtol=1e-5, atol=1e-6)


def pad_fraction(trainer) -> float:
    pads = total = 0
    for batch in trainer.get_train_dataloader():
        pads += int((batch["attention_mask"] == 0).sum())
        total += batch["attention_mask"].numel()
    return pads / total


def test_without_packing_batches_are_grouped_by_stored_length(tmp_path):
    import random

    from datasets import Dataset
    from transformers.trainer_pt_utils import LengthGroupedSampler

    rng = random.Random(0)
    examples = [[rng.randrange(3, 100) for _ in range(rng.randrange(2, 120))] for _ in range(256)]
    data = Dataset.from_list(features(examples))
    grouped = trainer_for({}, False, tmp_path, data)
    assert grouped.args.train_sampling_strategy == "group_by_length"
    sampler = grouped._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler) and sampler.lengths == data["length"], (
        "the tokenize step's lengths, not recomputed"
    )
    shuffled = trainer_for({"train_sampling_strategy": "random"}, False, tmp_path, data)
    assert pad_fraction(grouped) < 0.5 * pad_fraction(shuffled)
    assert trainer_for({}, True, tmp_path, data).args.train_sampling_strategy == "random", (
        "packed rows need no grouping"
    )
