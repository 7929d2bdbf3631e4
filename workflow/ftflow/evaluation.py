"""evaluate: loss, perplexity and task metrics of an experiment's final model.

    load model -> loss on packed batches -> generate -> score -> write

  loss/perplexity   on `eval.loss_split` (falling back to `eval.split`), packed
                    rows (no padding; a prefix every example of a row shares runs
                    once), cross-entropy summed over label tokens
  generation        on `eval.split`, batches of prompts sorted by length,
                    greedy (decoding.py: shared prefix once, finished rows
                    retired) or configured sampling (generate()), stopping at
                    the tokenizer's eos or the chat template's end-of-turn token
  task metrics      ftflow's `evaluate` modules, loaded by path
Writes predictions.jsonl, then metrics.json (the completion marker).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict

import torch

from . import decoding
from .atomic import write_json, write_text
from .data import load_split
from .errors import StageError
from .loss import labelled_positions, summed_label_loss
from .metrics import compute as compute_metric
from .metrics import metric_value
from .models import device_type, load_model, load_tokenizer
from .packing import PACKED_ATTENTION, packing_collator, shared_prefix_row
from .provenance import provenance
from .specs import EvalSpec, ExperimentSpec
from .status import read_status, status_reason

log = logging.getLogger("ftflow.eval")

# Tokens per packed forward pass of the loss computation: large enough to keep
# the matmuls busy, small enough that the (tokens x vocab) logits of the
# labelled positions stay well under a GiB in fp32 for a 150k vocabulary.
PACKED_TOKENS_PER_BATCH = 4096
ANSWER_MARKER = "ftflow-answer-marker"


# --------------------------------------------------------------------------- loss


def packed_batches(dataset, max_tokens: int = PACKED_TOKENS_PER_BATCH, share_prefix: bool = False):
    """Runs of consecutive examples up to max_tokens, each flattened into one row.

    With `share_prefix` (a model with ftflow_packed attention) a run whose
    examples start with the same unlabelled tokens carries them once
    (packing.shared_prefix_row).
    """
    collator = packing_collator()

    def row(batch):
        return (share_prefix and shared_prefix_row(batch)) or collator(batch)

    batch, size = [], 0
    for example in dataset:
        n = len(example["input_ids"])
        if batch and size + n > max_tokens:
            yield row(batch)
            batch, size = [], 0
        batch.append({"input_ids": example["input_ids"], "labels": example["labels"]})
        size += n
    if batch:
        yield row(batch)


@torch.no_grad()
def dataset_loss(model, dataset, device: str, max_tokens: int = PACKED_TOKENS_PER_BATCH) -> dict:
    """Mean cross-entropy per label token (nats) and its exp, over the whole split.

    The collator masks the first label of every example, so no example is
    scored on predicting its first token from the end of the one before it;
    the LM head runs only on positions that predict a label.
    """
    total, count = 0.0, 0
    share_prefix = getattr(model.config, "_attn_implementation", None) == PACKED_ATTENTION
    for batch in packed_batches(dataset, max_tokens, share_prefix):
        targets, keep = labelled_positions(batch.pop("labels").to(device))
        if keep.numel() == 0:
            continue
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        total += float(summed_label_loss(model, batch, targets, keep))
        count += int(keep.numel())
    if not count:
        return {"eval_loss": None, "perplexity": None, "eval_label_tokens": 0}
    loss = total / count
    try:
        perplexity = math.exp(loss)
    except OverflowError:
        perplexity = float("inf")
    return {"eval_loss": loss, "perplexity": perplexity, "eval_label_tokens": count}


# --------------------------------------------------------------------------- generation


def chat_end_of_turn(tokenizer) -> int | None:
    """The special token the chat template puts after an assistant answer (<|im_end|>, <|eot_id|>, ...).

    Many base models' tokenizers name a different eos (<|endoftext|>), and a
    model trained on chat rows learns to end its answer with the template's
    end-of-turn token: decoding must stop there too.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": ANSWER_MARKER}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that needs other roles or arguments: no end-of-turn to learn from it
        return None
    if not isinstance(text, str) or ANSWER_MARKER not in text:
        return None
    tail = text.split(ANSWER_MARKER, 1)[1]
    special = set(tokenizer.all_special_ids)
    return next((i for i in tokenizer(tail, add_special_tokens=False)["input_ids"] if i in special), None)


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every id that ends an answer: the model's and tokenizer's eos, and the chat end-of-turn."""
    ids: list[int] = []
    configured = getattr(generation_config, "eos_token_id", None)
    for value in (configured if isinstance(configured, list) else [configured]) + [
        tokenizer.eos_token_id,
        chat_end_of_turn(tokenizer),
    ]:
        if value is not None and value not in ids:
            ids.append(int(value))
    return ids


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: list[list[int]], spec: dict, device: str) -> list[dict]:
    """Batched decoding; per prompt (in input order) the new token ids up to the stop token.

    `spec`: the eval section's decoding settings (max_new_tokens, batch_size,
    do_sample, and temperature and top_p when sampling).

    Prompts are sorted by length so a batch wastes little padding. Greedy
    decoding of the families decoding.py knows runs there (the batch's shared
    prefix once, rows retired as they end); the rest runs generate() on
    left-padded batches.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    own_decoder = decoding.applies(model, spec)
    results: list[dict] = [{}] * len(prompts)
    for start in range(0, len(order), spec["batch_size"]):
        chunk = order[start : start + spec["batch_size"]]
        batch = [prompts[i] for i in chunk]
        if own_decoder:
            answers = decoding.greedy_batch(model, batch, spec["max_new_tokens"], stops, pad, device)
        else:
            answers = generate_batch(model, batch, spec, stops, pad, device)
        for i, answer in zip(chunk, answers):
            results[i] = answer
    return results


def generate_batch(model, prompts: list[list[int]], spec: dict, stops: list[int], pad: int, device: str) -> list[dict]:
    """generate() on one left-padded batch: with an attention mask every row's answer starts right
    after its own prompt, and generate() derives position ids from the mask, so a padded row sees
    the same positions as when run alone."""
    gen_kwargs = dict(
        max_new_tokens=spec["max_new_tokens"], do_sample=spec["do_sample"], pad_token_id=pad, eos_token_id=stops
    )
    if spec["do_sample"]:
        gen_kwargs.update(temperature=spec["temperature"], top_p=spec["top_p"])
    else:  # a model's generation_config may ask for sampling settings greedy decoding ignores
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **gen_kwargs)
    answers = []
    for row in range(len(prompts)):
        new = out[row, width:].tolist()
        end = next((j for j, token in enumerate(new) if token in stops), None)
        answers.append({"ids": new[:end] if end is not None else new, "stopped": end is not None})
    return answers


# --------------------------------------------------------------------------- scoring


def score(experiment: str, names, predictions: list[str], references: list[str]) -> tuple[dict, dict]:
    """(corpus-level metrics, {metric: per-example scores}); a metric that fails names itself."""
    task: dict = {}
    per_example: dict = {}
    if not predictions:
        return task, per_example
    for name in names:
        try:
            out = compute_metric(name, predictions, references)
        except ValueError as err:
            raise StageError(experiment, None, f"eval.metrics: {name} cannot score this dataset: {err}") from err
        per_example[name] = out.pop("per_example")
        task.update(out)
    return task, per_example


def evaluate_experiment(config_path: str, model_dir: str, data_dir: str, out_dir: str) -> dict:
    """Evaluate the experiment's final model; write predictions.jsonl, then metrics.json (the completion marker)."""
    experiment = ExperimentSpec.read(config_path)
    spec = experiment.eval
    os.makedirs(out_dir, exist_ok=True)
    result = {
        "experiment": experiment.name,
        "baseline": experiment.baseline,
        "dataset": spec.dataset,
        "split": spec.split,
        "primary_metric": spec.primary_metric,
    }
    status = read_status(model_dir)
    if status != "ok":  # the model diverged upstream: nothing to evaluate, and the status says why
        result.update(status=status, reason=status_reason(model_dir))
        return write_outputs(out_dir, experiment, result, rows=[])
    result["status"] = "ok"
    check_eval_rows(experiment.name, data_dir, spec)

    torch.manual_seed(0)  # sampling, when configured, is reproducible
    device = device_type()
    model, tokenizer = load_for_eval(model_dir, device)
    result.update(split_loss(model, data_dir, spec, device))
    rows = []
    test = generation_split(data_dir, spec)
    if test is not None:
        result["generation"], generated, predictions = generate(model, tokenizer, test, spec, device)
        result["metrics"], per_example = score(experiment.name, spec.metrics, predictions, list(test["reference"]))
        rows = prediction_rows(tokenizer, test, generated, predictions, per_example)
    result["primary_value"] = metric_value(result, spec.primary_metric)
    return write_outputs(out_dir, experiment, result, rows)


def _rows(data_dir: str, split: str) -> int:
    data = load_split(data_dir, split, columns=("length",))
    return len(data) if data is not None else 0


def check_eval_rows(experiment: str, data_dir: str, spec: EvalSpec) -> None:
    """Rows for the loss and, when the eval has task metrics, prompts to generate from; else a StageError
    naming the dataset, the split and what to set. Checked before the model is loaded, so that a
    held-out split that came out empty is never an `ok` evaluation without numbers.

    A kept split smaller than eval.batch_size is fine; zero rows is not.
    """
    dataset = spec.dataset
    if not _rows(data_dir, spec.loss_split) and not _rows(data_dir, spec.split):
        also = f" (nor {spec.split} rows, its fallback)" if spec.split != spec.loss_split else ""
        raise StageError(
            experiment,
            None,
            f"eval dataset {dataset!r} has no {spec.loss_split} rows{also} to compute the eval loss on; "
            f"hold some out with datasets.{dataset}.splits: {{{spec.loss_split}: 0.05}} (or give the source a "
            f"{spec.loss_split} file), or set eval.loss_split to a split with rows",
        )
    test = load_split(data_dir, spec.split, columns=("prompt_ids",))
    probe = test if test is not None else load_split(data_dir, "train", columns=("prompt_ids",))
    generates = probe is not None and "prompt_ids" in probe.column_names  # text data has no prompts to answer
    if spec.metrics and generates and not (test is not None and len(test)):
        raise StageError(
            experiment,
            None,
            f"eval dataset {dataset!r} has no {spec.split} rows to generate answers from for eval.metrics "
            f"({', '.join(spec.metrics)}); hold some out with datasets.{dataset}.splits: {{{spec.split}: 0.05}} "
            f"(or give the source a {spec.split} file), or set eval.split to a split with rows",
        )


def load_for_eval(model_dir: str, device: str):
    """(model in eval mode, fp32; its tokenizer)."""
    model = load_model(model_dir, torch.float32, device)
    model.eval()
    return model, load_tokenizer(model_dir)


def split_loss(model, data_dir: str, spec: EvalSpec, device: str) -> dict:
    """Loss and perplexity on `eval.loss_split`, or on `eval.split` when that split is absent ({} if neither has rows)."""
    loss_split = spec.loss_split if load_split(data_dir, spec.loss_split) is not None else spec.split
    loss_data = load_split(data_dir, loss_split)
    if loss_data is None or not len(loss_data):
        return {}
    return {**dataset_loss(model, loss_data, device), "loss_split": loss_split}


def generation_split(data_dir: str, spec: EvalSpec):
    """The first `eval.max_examples` rows of `eval.split`, when it has prompts to generate from (text data has none)."""
    test = load_split(data_dir, spec.split)
    if test is None or "prompt_ids" not in test.column_names:
        return None
    if spec.max_examples:
        test = test.select(range(min(spec.max_examples, len(test))))
    return test


def generate(model, tokenizer, test, spec: EvalSpec, device: str) -> tuple[dict, list[dict], list[str]]:
    """(the generation record of metrics.json, generate_ids' results, decoded predictions)."""
    prompts = list(test["prompt_ids"])
    started = time.time()
    generated = generate_ids(model, tokenizer, prompts, asdict(spec), device)
    seconds = time.time() - started
    predictions = [tokenizer.decode(g["ids"], skip_special_tokens=True).strip() for g in generated]
    record = {
        "examples": len(prompts),
        "seconds": round(seconds, 2),
        "examples_per_second": round(len(prompts) / seconds, 3) if seconds else None,
        "max_new_tokens": spec.max_new_tokens,
        "do_sample": spec.do_sample,
        "decoder": "ftflow greedy" if decoding.applies(model, asdict(spec)) else "transformers generate",
        "stop_token_ids": stop_token_ids(tokenizer, model.generation_config),
        # answers cut off by max_new_tokens before they ended: raise it if this is not 0
        "hit_max_new_tokens": sum(not g["stopped"] for g in generated),
    }
    return record, generated, predictions


def prediction_rows(tokenizer, test, generated: list[dict], predictions: list[str], per_example: dict) -> list[dict]:
    """predictions.jsonl: per example its prompt, reference, prediction and scores."""
    rows = []
    for i, (prompt, reference, prediction, gen) in enumerate(
        zip(test["prompt_ids"], test["reference"], predictions, generated)
    ):
        rows.append(
            {
                "index": i,
                "prompt": tokenizer.decode(prompt, skip_special_tokens=False),
                "reference": reference,
                "prediction": prediction,
                "new_tokens": len(gen["ids"]),
                "stopped": gen["stopped"],
                "scores": {metric: values[i] for metric, values in per_example.items()},
            }
        )
    return rows


def write_failed_eval(config_path: str, out_dir: str, reason: str) -> dict:
    """A search trial's evaluation that raised: no predictions, and metrics.json saying `failed` and why."""
    experiment = ExperimentSpec.read(config_path)
    os.makedirs(out_dir, exist_ok=True)
    result = {
        "experiment": experiment.name,
        "baseline": experiment.baseline,
        "dataset": experiment.eval.dataset,
        "split": experiment.eval.split,
        "primary_metric": experiment.eval.primary_metric,
        "status": "failed",
        "reason": f"evaluate: {reason}",
    }
    return write_outputs(out_dir, experiment, result, rows=[])


def write_outputs(out_dir: str, experiment: ExperimentSpec, result: dict, rows: list[dict]) -> dict:
    """Predictions first, metrics.json last: it marks the step complete."""
    write_text(
        os.path.join(out_dir, "predictions.jsonl"), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )
    write_json(os.path.join(out_dir, "metrics.json"), {**result, "provenance": provenance(experiment.config_hash)})
    return result
