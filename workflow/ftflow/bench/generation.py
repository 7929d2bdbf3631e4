"""Generation for eval: one prompt at a time (the recipe) vs ftflow's batched decoding.

The model is the measured experiment's merged model, the one its eval step
decodes with (a tuned model ends its answers; an untuned one runs every answer
to max_new_tokens, which would flatter batching). Both sides decode the same prompts of the test split (ftflow's tokenized
`prompt_ids`) greedily with the same stop tokens and `max_new_tokens`, so the
only difference is batching; their answers are compared token by token. Each
side warms up on one short decode first, then only the decoding is timed.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from ..errors import FtflowError


def _prompts(data_dir: str, split: str, count: int | None) -> list[list[int]]:
    from datasets import load_from_disk

    path = os.path.join(data_dir, split)
    if not os.path.isdir(path):
        raise FtflowError(f"bench: {data_dir} has no {split} split to generate for")
    data = load_from_disk(path)
    if "prompt_ids" not in data.column_names:
        raise FtflowError(
            f"bench: the {split} split of {data_dir} has no prompts (kind 'text' data cannot be generated for)"
        )
    if count is not None:
        data = data.select(range(min(count, len(data))))
    return [list(p) for p in data["prompt_ids"]]


def _greedy_kwargs(tokenizer, model, spec: dict) -> dict:
    from ..evaluation import stop_token_ids

    stops = stop_token_ids(tokenizer, model.generation_config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    # a model's generation_config may ask for sampling; greedy decoding ignores those settings
    return dict(
        max_new_tokens=spec["max_new_tokens"],
        do_sample=False,
        eos_token_id=stops,
        pad_token_id=pad,
        temperature=None,
        top_p=None,
        top_k=None,
    )


def _cut(new: list[int], stops: list[int]) -> list[int]:
    end = next((i for i, token in enumerate(new) if token in stops), None)
    return new[:end] if end is not None else new


@torch.no_grad()
def run_one_at_a_time(model_dir: str, data_dir: str, spec: dict, examples: int | None) -> dict:
    """The recipe: `AutoModelForCausalLM` with its default attention, `generate()` per prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = _prompts(data_dir, spec["split"], examples)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    kwargs = _greedy_kwargs(tokenizer, model, spec)

    def decode(prompt, **overrides):
        ids = torch.tensor([prompt])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **{**kwargs, **overrides})
        return _cut(out[0, len(prompt) :].tolist(), kwargs["eos_token_id"])

    decode(prompts[0], max_new_tokens=2)  # warm-up
    started = time.perf_counter()
    outputs = [decode(p) for p in prompts]
    seconds = time.perf_counter() - started
    return _result(outputs, seconds, spec["max_new_tokens"])


@torch.no_grad()
def run_batched(model_dir: str, data_dir: str, spec: dict, examples: int | None) -> dict:
    """ftflow's eval decoding: `models.load_model` and `evaluation.generate_ids` (length-sorted batches; greedy
    decoding runs decoding.py: the shared prefix once, rows retired as they stop)."""
    from .. import models
    from ..evaluation import generate_ids

    prompts = _prompts(data_dir, spec["split"], examples)
    model = models.load_model(model_dir, torch.float32, "cpu").eval()
    tokenizer = models.load_tokenizer(model_dir)
    generate_ids(model, tokenizer, prompts[:1], {**spec, "max_new_tokens": 2}, "cpu")  # warm-up
    started = time.perf_counter()
    generated = generate_ids(model, tokenizer, prompts, spec, "cpu")
    seconds = time.perf_counter() - started
    return _result([g["ids"] for g in generated], seconds, spec["max_new_tokens"])


def _result(outputs: list[list[int]], seconds: float, max_new_tokens: int) -> dict:
    return {
        "examples": len(outputs),
        "seconds": round(seconds, 3),
        "examples_per_second": round(len(outputs) / seconds, 3),
        "new_tokens": sum(len(o) for o in outputs),
        "hit_max_new_tokens": sum(len(o) >= max_new_tokens for o in outputs),
        "outputs": outputs,
    }


def compare_generation(inputs, settings, run_task, log=print) -> dict:
    """Both sides, alternating which goes first each round; examples/s and identical answers."""
    spec = dict(inputs.eval)
    examples = settings.generation_examples
    if spec.get("max_examples"):
        examples = min(examples or spec["max_examples"], spec["max_examples"])
    runs: dict[str, list[dict]] = {"one_at_a_time": [], "batched": []}
    for round_index in range(settings.generation_rounds):
        order = ("one_at_a_time", "batched") if round_index % 2 == 0 else ("batched", "one_at_a_time")
        for side in order:
            run = run_task(
                f"generate.{side}",
                model_dir=inputs.eval_model_dir,
                data_dir=inputs.eval_data_dir,
                spec=spec,
                examples=examples,
            )
            log(f"generate {side} round {round_index + 1}: {run['examples_per_second']:.2f} examples/s")
            runs[side].append(run)
    single, batched = runs["one_at_a_time"][0]["outputs"], runs["batched"][0]["outputs"]
    sides = {
        side: {
            "examples_per_second": statistics.median(r["examples_per_second"] for r in side_runs),
            "seconds": statistics.median(r["seconds"] for r in side_runs),
            "new_tokens": side_runs[0]["new_tokens"],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in side_runs),
        }
        for side, side_runs in runs.items()
    }
    return {
        "model": inputs.eval_model_dir,
        "examples": len(single),
        "hit_max_new_tokens": runs["one_at_a_time"][0]["hit_max_new_tokens"],
        "batch_size": spec["batch_size"],
        "max_new_tokens": spec["max_new_tokens"],
        "speedup": round(sides["batched"]["examples_per_second"] / sides["one_at_a_time"]["examples_per_second"], 3),
        "identical": sum(a == b for a, b in zip(single, batched)),
        "one_at_a_time": sides["one_at_a_time"],
        "batched": sides["batched"],
    }
