"""evaluate: loss, perplexity and task metrics of an experiment's final model.

  loss/perplexity   on the loss split, packed batches (no padding), summed over label tokens
  generation        on the eval split, left-padded batches sorted by prompt length,
                    greedy (or configured sampling) decoding
  task metrics      ftflow's `evaluate` modules, loaded by path
Writes predictions.jsonl, then metrics.json (the completion marker).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import torch
import torch.nn.functional as F

from . import models
from .atomic import read_json, write_json, write_text
from .config import content_hash
from .metrics import compute as compute_metric
from .packing import packing_collator
from .provenance import provenance

log = logging.getLogger("ftflow.eval")

PACKED_TOKENS_PER_BATCH = 4096


def _load_split(data_dir: str, split: str):
    from datasets import load_from_disk

    path = os.path.join(data_dir, split)
    return load_from_disk(path) if os.path.isdir(path) else None


def packed_batches(dataset, max_tokens: int = PACKED_TOKENS_PER_BATCH):
    """Greedy runs of consecutive examples up to max_tokens, each flattened into one row."""
    collator = packing_collator()
    batch, size = [], 0
    for row in dataset:
        n = len(row["input_ids"])
        if batch and size + n > max_tokens:
            yield collator(batch)
            batch, size = [], 0
        batch.append({"input_ids": row["input_ids"], "labels": row["labels"]})
        size += n
    if batch:
        yield collator(batch)


@torch.no_grad()
def dataset_loss(model, dataset, device: str) -> dict:
    total, count = 0.0, 0
    for batch in packed_batches(dataset):
        labels = batch.pop("labels").to(device)
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        targets = labels[0, 1:]
        keep = (targets != -100).nonzero().squeeze(-1)
        if keep.numel() == 0:
            continue
        logits = model(**batch, logits_to_keep=keep, use_cache=False).logits[0].float()
        total += float(F.cross_entropy(logits, targets[keep], reduction="sum"))
        count += int(keep.numel())
    loss = total / count if count else float("nan")
    return {"eval_loss": loss, "perplexity": math.exp(loss) if count and loss < 50 else float("inf"), "eval_label_tokens": count}


@torch.no_grad()
def generate_all(model, tokenizer, prompts: list[list[int]], spec: dict, device: str) -> list[str]:
    """Batched, left-padded decoding; returns the generated text per prompt, in input order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    outputs: list[str] = [""] * len(prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen_kwargs = dict(
        max_new_tokens=spec["max_new_tokens"],
        do_sample=spec["do_sample"],
        pad_token_id=pad,
    )
    if spec["do_sample"]:
        gen_kwargs.update(temperature=spec["temperature"], top_p=spec["top_p"])
    for start in range(0, len(order), spec["batch_size"]):
        chunk = order[start : start + spec["batch_size"]]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            n = len(prompts[i])
            ids[row, width - n :] = torch.tensor(prompts[i])
            mask[row, width - n :] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **gen_kwargs)
        for row, i in enumerate(chunk):
            outputs[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    return outputs


def evaluate_experiment(config_path: str, model_dir: str, data_dir: str, out_dir: str) -> dict:
    experiment = read_json(config_path)
    spec = experiment["eval"]
    metrics_path = os.path.join(out_dir, "metrics.json")
    predictions_path = os.path.join(out_dir, "predictions.jsonl")
    os.makedirs(out_dir, exist_ok=True)
    base = {
        "experiment": experiment["name"],
        "baseline": experiment["baseline"],
        "dataset": spec["dataset"],
        "split": spec["split"],
        "primary_metric": spec["primary_metric"],
    }
    status = models.read_status(model_dir)
    if status != "ok":
        write_text(predictions_path, "")
        result = {**base, "status": status, "reason": read_json(os.path.join(model_dir, models.STATUS_FILE)).get("reason")}
        write_json(metrics_path, {**result, "provenance": provenance(content_hash(experiment))})
        return result

    torch.manual_seed(0)
    device = models.device_type()
    model = models.load_model(model_dir, torch.float32, device)
    model.eval()
    tokenizer = models.load_tokenizer(model_dir)

    result = {**base, "status": "ok"}
    loss_data = _load_split(data_dir, spec["loss_split"]) or _load_split(data_dir, spec["split"])
    if loss_data is not None and len(loss_data):
        result.update(dataset_loss(model, loss_data, device))
        result["loss_split"] = spec["loss_split"] if _load_split(data_dir, spec["loss_split"]) is not None else spec["split"]

    test = _load_split(data_dir, spec["split"])
    rows = []
    if test is not None and "prompt_ids" in test.column_names:
        if spec["max_examples"]:
            test = test.select(range(min(spec["max_examples"], len(test))))
        prompts = list(test["prompt_ids"])
        references = list(test["reference"])
        started = time.time()
        predictions = generate_all(model, tokenizer, prompts, spec, device)
        seconds = time.time() - started
        result["generation"] = {
            "examples": len(prompts),
            "seconds": round(seconds, 2),
            "examples_per_second": round(len(prompts) / seconds, 3) if seconds else None,
            "max_new_tokens": spec["max_new_tokens"],
            "do_sample": spec["do_sample"],
        }
        scores: dict[str, list] = {}
        task = {}
        for name in spec["metrics"]:
            out = compute_metric(name, predictions, references)
            scores[name] = out.pop("per_example")
            task.update(out)
        result["metrics"] = task
        for i, (prompt, reference, prediction) in enumerate(zip(prompts, references, predictions)):
            rows.append(
                {
                    "index": i,
                    "prompt": tokenizer.decode(prompt, skip_special_tokens=False),
                    "reference": reference,
                    "prediction": prediction,
                    "scores": {name: values[i] for name, values in scores.items()},
                }
            )
    primary = spec["primary_metric"]
    result["primary_value"] = (result.get("metrics") or {}).get(primary, result.get(primary))
    write_text(predictions_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_json(metrics_path, {**result, "provenance": provenance(content_hash(experiment))})
    return result
