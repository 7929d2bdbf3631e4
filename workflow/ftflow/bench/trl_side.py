"""The TRL side of the peer comparison: TRL's `SFTTrainer` on the rows ftflow trains on.

TRL's documented recipe for this job, and nothing of ftflow's training code:
  the rows as conversational prompt-completion records (peer_rows.py), so that
  `completion_only_loss` (TRL's default for that shape) puts the loss on the
  answer turn; TRL tokenizes them with the model's chat template itself;
  `SFTConfig(padding_free=True)`: each batch flattened into one row with
  position ids restarting per example, as ftflow's (TRL's `packing=True` would
  pack many examples into each of the batch's rows: another job, not run here);
  `peft_config=LoraConfig(...)` with the experiment's LoRA settings;
  fp32 on the CPU, set explicitly: TRL 1.16's `SFTConfig` turns `bf16` on by
  default, on the CPU too, where accelerate then runs the forward under bf16
  autocast (another job: its first-step loss was 1.6314 against the fp32
  model's 1.6300 on the same rows);
  TRL's own loss (its fused LM head: the LM head in tiles, per-token log-probs,
  and the entropy and top-1 accuracy it logs as metrics). Only on CUDA/XPU with
  Triton does it project just the positions that predict a label; on the CPU
  it projects every position of the row.

The same model folder, the same first `steps x batch` rows in the same order
(sequential sampler), and the same optimizer, schedule, batch, accumulation,
steps and seed as ftflow's side (train_throughput.SHARED_OPTIMIZER_KEYS).
"""

from __future__ import annotations

from importlib.metadata import version

import torch

from ..model_setup import checkpoints_activations
from .flops import linear_weights
from .peer_rows import compare_labels, peer_records
from .train_throughput import StepClock, _example_counts, _examples, _measure, _shared_arguments

IGNORE = -100


def trl_config(stage: dict, steps: int, out_dir: str, device: str = "cpu", bf16: bool = False):
    """The SFTConfig of the TRL side: the experiment's optimizer settings, padding-free batches,
    bf16 only where ftflow's side trains in bf16 (TRL's own default is bf16 on)."""
    from trl import SFTConfig

    shared = _shared_arguments(stage)
    return SFTConfig(
        output_dir=out_dir,
        per_device_train_batch_size=int(stage["training"]["per_device_train_batch_size"]),
        max_steps=steps,
        max_length=None,  # the rows are ftflow's examples, already within max_length: no second cut
        padding_free=True,
        # TRL turns activation checkpointing on by default; ftflow's side runs the stage's setting
        gradient_checkpointing=checkpoints_activations(stage["training"]),
        completion_only_loss=None,  # TRL decides from the records: prompt-completion -> loss on the completion
        train_sampling_strategy="sequential",
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        logging_nan_inf_filter=False,
        disable_tqdm=True,
        use_cpu=device == "cpu",
        bf16=bf16,
        fp16=False,
        **shared,
    )


def build_trl_trainer(model_dir: str, records: list[dict], stage: dict, method: str, config, callbacks=()):
    """SFTTrainer on `records`, the model in fp32, LoRA through `peft_config` (TRL wraps the model itself)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTTrainer

    set_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_config = LoraConfig(task_type="CAUSAL_LM", **stage["lora"]) if method == "lora" else None
    return SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=list(callbacks),
    )


def trl_examples(trainer) -> list[dict]:
    """TRL's tokenized examples as {input_ids, labels}: TRL's own labels column (-100 where its loss does not
    look), or, where a TRL version keeps only the masks, the labels they give."""
    out = []
    for row in trainer.train_dataset:
        ids = row["input_ids"]
        if "labels" in row:
            labels = row["labels"]
        else:
            mask = row.get("completion_mask") or row.get("assistant_masks") or [1] * len(ids)
            labels = [t if m else IGNORE for t, m in zip(ids, mask)]
        out.append({"input_ids": ids, "labels": labels})
    return out


def run_trl_side(
    model_dir: str,
    data_dir: str,
    data_spec: str,
    workdir: str,
    stage: dict,
    method: str,
    steps: int,
    out_dir: str,
    save_dir: str | None = None,
    device: str = "cpu",
    bf16: bool = False,
    callbacks: tuple = (),
) -> dict:
    """Train with TRL on ftflow's first `steps x batch` rows; timings, losses, and (save_dir) the trained artifact."""
    batch = int(stage["training"]["per_device_train_batch_size"])
    per_step = batch * int(_shared_arguments(stage).get("gradient_accumulation_steps", 1))
    examples = _examples(data_dir, steps * per_step)
    lengths, useful = _example_counts(examples)
    kind, records = peer_records(data_spec, workdir, list(examples["source_row"]))
    config = trl_config(stage, steps, out_dir, device, bf16)
    clock = StepClock(device)
    trainer = build_trl_trainer(model_dir, records, stage, method, config, callbacks=[clock, *callbacks])
    ours = [{"input_ids": i, "labels": lab} for i, lab in zip(examples["input_ids"], examples["labels"])]
    labels = compare_labels(ours, trl_examples(trainer))
    # TRL's LM head: every position on the CPU, only those that predict a label with Triton (module doc)
    logits = lengths if device == "cpu" else useful
    out = _measure(
        trainer, clock, method, linear_weights(trainer.model), per_step, lengths, useful, lengths, logits, device
    )
    packages = ("trl", "transformers", "peft", "datasets", "accelerate", "torch")
    out.update(side="trl", kind=kind, labels=labels, examples=len(lengths), versions={p: version(p) for p in packages})
    if save_dir:
        trainer.save_model(save_dir)
    return out
