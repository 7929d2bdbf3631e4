"""Evaluation: packed loss equals per-example loss, batched greedy equals one-at-a-time, decoding stops at end-of-turn."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from datasets import Dataset

from ftflow.errors import StageError
from ftflow.evaluation import (
    chat_end_of_turn,
    check_eval_rows,
    dataset_loss,
    evaluate_experiment,
    generate_ids,
    stop_token_ids,
)
from ftflow.packing import PACKED_ATTENTION
from ftflow.prepare import tiny_model
from ftflow.specs import EvalSpec, ExperimentSpec
from helpers import tiny_llama

GREEDY = {"max_new_tokens": 8, "do_sample": False, "temperature": 1.0, "top_p": 1.0}


def labelled_rows() -> Dataset:
    """Rows of different lengths; the first tokens of each (the prompt) carry no label."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    for length, prompt in [(9, 4), (5, 2), (14, 6), (7, 7 - 3), (11, 1)]:
        ids = torch.randint(3, 101, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return Dataset.from_list(rows)


@torch.no_grad()
@pytest.mark.parametrize("attention", [PACKED_ATTENTION, "sdpa"])
@pytest.mark.parametrize("max_tokens", [4096, 16])  # one packed row, and several (16 tokens force a split)
def test_packed_loss_equals_per_example_loss(attention, max_tokens):
    model = tiny_llama(attention).eval()
    rows = labelled_rows()
    total, count = 0.0, 0
    for row in rows:  # each example alone, no packing: HF's own shift-and-ignore convention
        logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
        targets = torch.tensor(row["labels"][1:])
        total += float(torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum"))
        count += int((targets != -100).sum())
    out = dataset_loss(model, rows, "cpu", max_tokens=max_tokens)
    assert out["eval_label_tokens"] == count == sum(len(r["input_ids"]) - p for r, p in zip(rows, [4, 2, 6, 4, 1]))
    assert out["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert out["perplexity"] == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)


def test_packed_loss_would_differ_if_examples_saw_each_other():
    """The check above can fail: scoring the rows as one unbroken sequence gives another loss."""
    model = tiny_llama(PACKED_ATTENTION).eval()
    rows = labelled_rows()
    joined = Dataset.from_list([{"input_ids": sum(rows["input_ids"], []), "labels": sum(rows["labels"], [])}])
    apart, joined_loss = dataset_loss(model, rows, "cpu")["eval_loss"], dataset_loss(model, joined, "cpu")["eval_loss"]
    assert abs(joined_loss - apart) > 1e-3  # about 4e-3 here, some 80x the tolerance of the equality above


@pytest.fixture(scope="module")
def smoke_model_and_tokenizer(embedded_tokenizer):
    """The smoke-mode stand-in: a tiny random llama with the embedded SmolLM2 tokenizer."""
    model = tiny_model("llama", embedded_tokenizer, seed=3).eval()
    model.config._attn_implementation = PACKED_ATTENTION  # what evaluation loads on a CPU
    return model, embedded_tokenizer


def chat_prompts(tokenizer) -> list[list[int]]:
    questions = [
        "Map `Veh. Type`.",
        "Map these headers: 排放标准, EF (g/km), Year, Fuel type, Region code.",
        "Hi",
        "Map `NOx`, `PM2.5`.",
    ]
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for q in questions
    ]


def test_batched_greedy_equals_one_at_a_time(smoke_model_and_tokenizer):
    model, tokenizer = smoke_model_and_tokenizer
    prompts = chat_prompts(tokenizer)
    assert len({len(p) for p in prompts}) == len(prompts), "prompts of different lengths, so the batch is padded"
    batched = generate_ids(model, tokenizer, prompts, {**GREEDY, "batch_size": 4}, "cpu")
    alone = generate_ids(model, tokenizer, prompts, {**GREEDY, "batch_size": 1}, "cpu")
    assert [b["ids"] for b in batched] == [a["ids"] for a in alone]
    assert all(len(a["ids"]) > 0 for a in alone)


def test_right_padding_would_change_the_answers(smoke_model_and_tokenizer):
    """The equality above is not vacuous: with padding after the prompt the short prompts' answers change."""
    model, tokenizer = smoke_model_and_tokenizer
    prompts = chat_prompts(tokenizer)
    alone = generate_ids(model, tokenizer, prompts, {**GREEDY, "batch_size": 1}, "cpu")
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([p + [pad] * (width - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=pad)
    assert any(out[i, width : width + len(a["ids"])].tolist() != a["ids"] for i, a in enumerate(alone))


def always_emits(model, token_id: int):
    """A copy of `model` whose LM head puts all probability on one token."""
    rigged = copy.deepcopy(model)
    head = torch.nn.Linear(rigged.config.hidden_size, rigged.config.vocab_size, bias=True)
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.fill_(-10.0)
        head.bias[token_id] = 10.0
    rigged.lm_head = head
    rigged.config.tie_word_embeddings = False
    return rigged


def test_decoding_stops_at_the_chat_end_of_turn_even_when_eos_differs(smoke_model_and_tokenizer):
    model, tokenizer = smoke_model_and_tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    base_tokenizer = copy.deepcopy(tokenizer)
    base_tokenizer.eos_token = "<|endoftext|>"  # as many base models' tokenizers name it
    assert base_tokenizer.eos_token_id != end_of_turn
    assert chat_end_of_turn(base_tokenizer) == end_of_turn
    assert set(stop_token_ids(base_tokenizer)) == {base_tokenizer.eos_token_id, end_of_turn}

    prompts = chat_prompts(tokenizer)[:2]
    rigged = always_emits(model, end_of_turn)
    rigged.generation_config.eos_token_id = None  # only ftflow's own stop list can stop it
    stopped = generate_ids(rigged, base_tokenizer, prompts, {**GREEDY, "batch_size": 2}, "cpu")
    assert stopped == [{"ids": [], "stopped": True}] * 2

    word = tokenizer.convert_tokens_to_ids("Paris") if "Paris" in tokenizer.get_vocab() else 1000
    running = generate_ids(always_emits(model, word), base_tokenizer, prompts, {**GREEDY, "batch_size": 2}, "cpu")
    assert running == [{"ids": [word] * 8, "stopped": False}] * 2


# --------------------------------------------------------------------------- nothing to evaluate


def eval_config(tmp_path, metrics: list[str]) -> str:
    """An experiment's config.json whose eval scores dataset `corpus` on test (loss on validation)."""
    evaluation = EvalSpec(
        dataset="corpus",
        data_id="corpus-1",
        split="test",
        loss_split="validation",
        max_new_tokens=8,
        batch_size=16,
        do_sample=False,
        temperature=1.0,
        top_p=1.0,
        max_examples=None,
        metrics=tuple(metrics),
        primary_metric=metrics[0] if metrics else None,
    )
    spec = ExperimentSpec(name="lora-1", model="smol", stages=(), eval=evaluation, baseline=True)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(spec.to_json()))
    return str(path)


def tokenized(tmp_path, **splits: int) -> str:
    """A tokenize output folder with `rows` instruction rows in each named split."""
    folder = tmp_path / "data"
    for split, rows in splits.items():
        row = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "prompt_ids": [5], "reference": "x", "length": 3}
        Dataset.from_list([row] * rows).save_to_disk(str(folder / split))
    return str(folder)


def test_nothing_to_evaluate_is_an_error_before_the_model_loads(tmp_path):
    config = eval_config(tmp_path, ["exact_match"])
    data = tokenized(tmp_path, train=20)  # one document: no row held out
    with pytest.raises(StageError) as info:
        evaluate_experiment(config, str(tmp_path / "no-model"), data, str(tmp_path / "eval"))
    assert str(info.value) == (
        "experiment 'lora-1': eval dataset 'corpus' has no validation rows (nor test rows, its fallback) to compute "
        "the eval loss on; hold some out with datasets.corpus.splits: {validation: 0.05} (or give the source a "
        "validation file), or set eval.loss_split to a split with rows"
    )
    assert not (tmp_path / "eval" / "metrics.json").exists(), "never an ok evaluation without numbers"

    data = tokenized(tmp_path / "val", train=20, validation=1)
    with pytest.raises(StageError) as info:
        evaluate_experiment(config, str(tmp_path / "no-model"), data, str(tmp_path / "eval"))
    assert str(info.value) == (
        "experiment 'lora-1': eval dataset 'corpus' has no test rows to generate answers from for eval.metrics "
        "(exact_match); hold some out with datasets.corpus.splits: {test: 0.05} (or give the source a test file), "
        "or set eval.split to a split with rows"
    )
    spec = ExperimentSpec.read(eval_config(tmp_path, [])).eval
    assert check_eval_rows("lora-1", data, spec) is None, "one validation row and no metrics: the loss is enough"
