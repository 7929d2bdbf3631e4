"""ftflow's greedy decoder gives generate()'s answers, one prompt at a time, while sharing the prefix and retiring rows."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ftflow import decoding
from ftflow.packing import PACKED_ATTENTION
from ftflow.prepare import TINY_SIZES

GREEDY = {"max_new_tokens": 10, "do_sample": False}
QUESTIONS = [
    "Map `Veh. Type`.",
    "Map these headers: 排放标准, EF (g/km), Year, Fuel type, Region code.",
    "Hi",
    "Map `NOx`, `PM2.5`.",
    "Which canonical field is the header `Odometer (km)`?",
]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model(request, embedded_tokenizer):
    """A 2-layer random model whose answers vary from prompt to prompt and token to token.

    (prepare.tiny_model ties its embeddings, and its greedy answers then repeat the last prompt token.)
    """
    config = AutoConfig.for_model(
        request.param,
        vocab_size=len(embedded_tokenizer),
        **TINY_SIZES,
        tie_word_embeddings=False,
        initializer_range=0.1,
        eos_token_id=embedded_tokenizer.eos_token_id,
        pad_token_id=embedded_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.config._attn_implementation = PACKED_ATTENTION  # what evaluation loads on a CPU
    return model


@pytest.fixture(scope="module")
def prompts(embedded_tokenizer) -> list[list[int]]:
    return [
        embedded_tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for q in QUESTIONS
    ]


@torch.no_grad()
def generate_alone(model, prompt: list[int], stops: list[int], max_new_tokens: int) -> dict:
    """transformers' generate() on one unpadded prompt: the reference."""
    out = model.generate(
        input_ids=torch.tensor([prompt]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stops,
        pad_token_id=stops[0],
        temperature=None,
        top_p=None,
        top_k=None,
    )
    new = out[0, len(prompt) :].tolist()
    end = next((j for j, token in enumerate(new) if token in stops), None)
    return {"ids": new[:end] if end is not None else new, "stopped": end is not None}


def batch_sizes(model):
    """Records the batch size of every forward call of `model` (remove the returned handle after)."""
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(
        lambda _m, _a, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    return sizes, handle


def test_answers_equal_generate_one_prompt_at_a_time(model, prompts, embedded_tokenizer):
    stops = [embedded_tokenizer.eos_token_id]
    assert decoding.shared_prefix(prompts) >= decoding.MIN_SHARED_PREFIX, "the chat template's system prompt is shared"
    assert len({len(p) for p in prompts}) == len(prompts), "prompts of different lengths, so rows are padded"
    ours = decoding.greedy_batch(model, prompts, 10, stops, embedded_tokenizer.pad_token_id, "cpu")
    assert ours == [generate_alone(model, p, stops, 10) for p in prompts]
    assert all(len(answer["ids"]) == 10 for answer in ours)
    assert len({tuple(answer["ids"]) for answer in ours}) == len(prompts)  # not one answer for every prompt


def test_rows_that_stop_leave_the_batch_and_the_rest_go_on(model, prompts, embedded_tokenizer):
    """Stop tokens picked from the answers themselves, so rows end at different steps."""
    pad = embedded_tokenizer.pad_token_id
    free = decoding.greedy_batch(model, prompts, 10, [embedded_tokenizer.eos_token_id], pad, "cpu")
    stops = [free[0]["ids"][2], free[1]["ids"][5]]  # prompt 0 ends at its 3rd token, prompt 1 by its 6th
    sizes, handle = batch_sizes(model)
    try:
        ours = decoding.greedy_batch(model, prompts, 10, stops, pad, "cpu")
    finally:
        handle.remove()
    assert ours == [generate_alone(model, p, stops, 10) for p in prompts]
    assert ours[0]["stopped"] and ours[1]["stopped"] and len(ours[0]["ids"]) <= 2
    assert sizes[0] == 1 and sizes[1] == len(prompts)  # the shared prefix alone, then every prompt's own tokens
    assert sizes[2:] == sorted(sizes[2:], reverse=True) and min(sizes[2:]) < len(prompts)


def test_without_a_shared_prefix_the_prompts_run_whole(model, embedded_tokenizer):
    prompts = [[5, 6, 7, 8, 9], [9, 8, 7], [5, 6, 7, 1, 2, 3]]  # [5, 6, 7] is too short a prefix to share
    assert decoding.shared_prefix(prompts) == 0
    stops = [embedded_tokenizer.eos_token_id]
    sizes, handle = batch_sizes(model)
    try:
        ours = decoding.greedy_batch(model, prompts, 6, stops, embedded_tokenizer.pad_token_id, "cpu")
    finally:
        handle.remove()
    assert sizes[0] == len(prompts)
    assert ours == [generate_alone(model, p, stops, 6) for p in prompts]


def test_shared_prefix_leaves_every_prompt_a_token_of_its_own():
    base = list(range(10, 20))
    assert decoding.shared_prefix([base, base + [1], base + [2, 3]]) == 9  # the shortest keeps its last token
    assert decoding.shared_prefix([base[:3] + [1], base[:3] + [2]]) == 0  # under MIN_SHARED_PREFIX
    assert decoding.shared_prefix([base]) == 9


def test_sampling_other_families_and_sliding_windows_use_generate(model):
    assert decoding.applies(model, {"do_sample": False})
    assert not decoding.applies(model, {"do_sample": True})

    class Config:
        model_type = "gpt2"

    class Other:
        config = Config()

    assert not decoding.applies(Other(), {"do_sample": False})
    Config.model_type, Config.layer_types = "qwen3", ["full_attention", "sliding_attention"]
    assert not decoding.applies(Other(), {"do_sample": False})
    Config.layer_types = ["full_attention", "full_attention"]
    assert decoding.applies(Other(), {"do_sample": False})
    Config.sliding_window = 4096  # with layer_types it says only which layers slide
    assert decoding.applies(Other(), {"do_sample": False})
    Config.model_type, Config.layer_types = "mistral", None  # no layer_types: the window applies to every layer
    assert not decoding.applies(Other(), {"do_sample": False})
    Config.sliding_window = None
    assert decoding.applies(Other(), {"do_sample": False})


@pytest.mark.parametrize(
    "setting", [{"repetition_penalty": 1.3}, {"no_repeat_ngram_size": 2}, {"num_beams": 2}, {"suppress_tokens": [5]}]
)
def test_a_generation_config_that_changes_greedy_answers_keeps_generate(model, setting):
    """generate() applies these from the model's generation_config even when decoding greedily."""
    saved = {key: getattr(model.generation_config, key) for key in setting}
    try:
        for key, value in setting.items():
            setattr(model.generation_config, key, value)
        assert not decoding.applies(model, {"do_sample": False})
        for key in setting:
            setattr(model.generation_config, key, decoding.ANSWER_CHANGING[key])  # the neutral value is fine
        assert decoding.applies(model, {"do_sample": False})
    finally:
        for key, value in saved.items():
            setattr(model.generation_config, key, value)
