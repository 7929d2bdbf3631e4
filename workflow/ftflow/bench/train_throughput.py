"""Training throughput: the recipe people copy vs ftflow's train path, same examples and steps.

Baseline recipe (the Hugging Face fine-tuning tutorial, as most scripts copy it):
  each row rendered to text, `tokenizer(text, padding="max_length", truncation=True,
  max_length=L)`, `DataCollatorForLanguageModeling(mlm=False)` (labels = every
  non-pad token), `AutoModelForCausalLM.from_pretrained` with its default attention,
  default `Trainer`; LoRA through `get_peft_model(LoraConfig(...))`.
ftflow: `model_setup.setup_for_training`, the packing collator (one row, no padding,
  position ids restarting per example), `FtflowTrainer` (logits only where a label
  is) with ftflow's per-example attention, exactly as `ftflow train` builds them.

Both sides: the first `steps x batch` examples of ftflow's tokenized train split,
in order (sequential sampler), the same optimizer settings, no checkpoints.
Useful tokens are the tokens that carry a label in ftflow's task definition (for
chat data, the assistant turns), counted on the same examples for both sides.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
from transformers import TrainerCallback

from ..errors import FtflowError
from .flops import linear_weights, training_flops

IGNORE = -100
# TrainingArguments both sides share, taken from the experiment's resolved stage.
SHARED_OPTIMIZER_KEYS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "optim",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "gradient_accumulation_steps",
    "seed",
)


# --------------------------------------------------------------------------- shared pieces (worker side)


def _examples(data_dir: str, count: int):
    """The first `count` examples of ftflow's tokenized train split."""
    from datasets import load_from_disk

    train = load_from_disk(os.path.join(data_dir, "train"))
    if len(train) < count:
        raise FtflowError(
            f"bench: the train split of {data_dir} has {len(train)} examples; the run needs {count} (fewer steps, or more rows)"
        )
    return train.select(range(count))


def _example_counts(examples) -> tuple[list[int], list[int]]:
    """(tokens, useful tokens) per example; useful = labelled, the first token excluded (nothing predicts it)."""
    lengths = [len(ids) for ids in examples["input_ids"]]
    useful = [sum(1 for t in labels[1:] if t != IGNORE) for labels in examples["labels"]]
    return lengths, useful


class StepClock(TrainerCallback):
    """Wall time (perf_counter) at the start of training and at the end of every optimizer step,
    and this process's CPU time (all threads) at each step end."""

    def __init__(self, device: str):
        self.device = device
        self.started = 0.0
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.device == "cuda":  # the step is done when the GPU is, not when Python queued it
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())

    @property
    def step_seconds(self) -> list[float]:
        return [round(end - start, 3) for start, end in zip([self.started] + self.ends, self.ends)]


def _measure(
    trainer,
    clock,
    method: str,
    weights: dict,
    per_step: int,
    lengths,
    useful,
    positions_per_example,
    logits_per_example,
    device: str,
) -> dict:
    """Run trainer.train() and count what the timed steps (all but the first) did."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - started
    steps = len(clock.ends)
    if steps < 2:
        raise FtflowError("bench: a training run needs at least 2 optimizer steps (the first one is not timed)")
    timed = slice(per_step, steps * per_step)  # examples of steps 2..n, in order (sequential sampler)
    real = sum(lengths[timed])
    positions = sum(positions_per_example[timed])
    logits = sum(logits_per_example[timed])
    useful_tokens = sum(useful[timed])
    seconds = clock.ends[-1] - clock.ends[0]
    all_positions = sum(positions_per_example[: steps * per_step])
    out = {
        "method": method,
        "steps": steps,
        "examples_per_step": per_step,
        "wall_seconds": round(wall, 3),
        "timed_steps": steps - 1,
        "timed_seconds": round(seconds, 3),
        # CPU time of the timed steps: on a busy machine it still tracks the work done, where wall time does not
        "timed_cpu_seconds": round(clock.cpu_ends[-1] - clock.cpu_ends[0], 3),
        "step_seconds": clock.step_seconds,
        "tokens": {"real": real, "positions": positions, "useful": useful_tokens, "logit_positions": logits},
        "pad_fraction": round(1 - sum(lengths[: steps * per_step]) / all_positions, 4),
        "useful_tokens_per_second": round(useful_tokens / seconds, 2),
        "real_tokens_per_second": round(real / seconds, 2),
        # the work the examples need (body on real tokens, LM head where a label is) ...
        "model_flops": training_flops(weights, method, real, useful_tokens),
        # ... and what this side executed (pad positions and every logit included)
        "executed_flops": training_flops(weights, method, positions, logits),
        "weights": weights,
        "train_loss": result.training_loss,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],  # one per logging step
    }
    if device == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _shared_arguments(stage: dict) -> dict:
    return {k: stage["training"][k] for k in SHARED_OPTIMIZER_KEYS if k in stage["training"]}


# --------------------------------------------------------------------------- the two sides (worker side)


def run_baseline_recipe(
    model_dir: str,
    data_dir: str,
    data_spec: str,
    workdir: str,
    stage: dict,
    method: str,
    steps: int,
    max_length: int,
    out_dir: str,
    device: str = "cpu",
    bf16: bool = False,
) -> dict:
    """The padded recipe, on the same examples as ftflow's run (see the module docstring)."""
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from ..atomic import read_json
    from ..data import Encoder
    from ..sources import cut_splits, load_source

    shared = _shared_arguments(stage)
    batch = int(stage["training"]["per_device_train_batch_size"])
    per_step = batch * int(shared.get("gradient_accumulation_steps", 1))
    examples = _examples(data_dir, steps * per_step)
    lengths, useful = _example_counts(examples)

    # The same rows, rendered to text the way ftflow renders them (for chat: the tokenizer's chat template).
    spec = read_json(data_spec)
    if spec["kind"] == "text":
        raise FtflowError(
            f"bench: dataset {spec['dataset']!r} is kind 'text'; the training comparison needs chat or instruction rows"
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoder = Encoder(tokenizer, spec["kind"], spec["encoding"], max_length, spec["dataset"])
    rows, _ = cut_splits(load_source(spec, workdir), spec.get("splits"), spec["dataset"])
    by_source = {row.where: row.values for row in rows["train"]}
    rendered = [encoder.render(by_source[where]) for where in examples["source_row"]]
    texts = [r["text"] if "text" in r else r["prompt"] + r["completion"] for r in rendered]

    recipe = Dataset.from_dict({"text": texts}).map(
        lambda b: tokenizer(b["text"], padding="max_length", truncation=True, max_length=max_length),
        batched=True,
        remove_columns=["text"],
    )
    # the same tokens as ftflow's examples, then padding
    identical = sum(
        list(ids[: int(sum(mask))]) == list(ref)
        for ids, mask, ref in zip(recipe["input_ids"], recipe["attention_mask"], examples["input_ids"])
    )

    dtype = torch.bfloat16 if bf16 else torch.float32
    model = _recipe_model(model_dir, method, stage, dtype, device)
    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=batch,
        max_steps=steps,
        report_to="none",
        save_strategy="no",
        logging_steps=max(1, steps),
        disable_tqdm=True,
        use_cpu=device == "cpu",
        bf16=bf16,
        train_sampling_strategy="sequential",
        **shared,
    )
    clock = StepClock(device)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=recipe,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[clock],
    )
    padded = [max_length] * len(lengths)  # every position of every padded row is computed, logits included
    out = _measure(trainer, clock, method, linear_weights(model), per_step, lengths, useful, padded, padded, device)
    out.update(side="baseline", identical_token_examples=int(identical), examples=len(lengths))
    return out


def _recipe_model(model_dir: str, method: str, stage: dict, dtype, device: str):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype}
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        kwargs["device_map"] = {"": 0 if device == "cuda" else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if device == "cuda" and method != "qlora":
        model = model.to("cuda")
    if method == "full":
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method == "qlora":
        model = prepare_model_for_kbit_training(model)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **stage["lora"]))


def run_ftflow_path(
    model_dir: str,
    data_dir: str,
    stage: dict,
    method: str,
    steps: int,
    out_dir: str,
    device: str = "cpu",
    bf16: bool = False,
    save_dir: str | None = None,
    callbacks: tuple = (),
) -> dict:
    """ftflow's train path, built from the pieces `ftflow train` uses, on the same examples
    (save_dir: where the trained adapter or model goes, as `ftflow train` saves it; callbacks: more
    TrainerCallbacks, e.g. a profiler)."""
    from transformers import set_seed

    from ..model_setup import setup_for_training
    from ..packing import packing_collator, padding_collator
    from ..specs import StageSpec
    from ..train import load_training_data
    from ..trainer import DivergenceGuard, FtflowTrainer, build_training_arguments

    stage = _stage_for(stage, method, steps, bf16)
    per_step = int(stage["training"]["per_device_train_batch_size"]) * int(
        stage["training"].get("gradient_accumulation_steps", 1)
    )
    # the order of `ftflow train`: data, arguments, seed, model
    train, _, _ = load_training_data([data_dir], StageSpec.from_json(stage), "bench")
    if len(train) < steps * per_step:
        raise FtflowError(
            f"bench: the train split of {data_dir} has {len(train)} examples; the run needs {steps * per_step}"
        )
    train = train.select(range(steps * per_step))
    lengths, useful = _example_counts(train)
    args = build_training_arguments(stage["training"], stage["packing"], out_dir, False, "bench/ftflow", device)
    set_seed(args.seed)
    model, tokenizer, _ = setup_for_training(StageSpec.from_json(stage), model_dir, None, device)
    clock = StepClock(device)
    collator = packing_collator() if stage["packing"] else padding_collator(tokenizer)
    trainer = FtflowTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[clock, *callbacks],
    )
    trainer.add_callback(DivergenceGuard(trainer, stage["divergence"]["factor"], stage["divergence"]["warmup_steps"]))
    # packed: each example's own tokens and nothing else; logits only where a label is
    out = _measure(trainer, clock, method, linear_weights(model), per_step, lengths, useful, lengths, useful, device)
    out.update(side="ftflow", attention=model.config._attn_implementation, examples=len(lengths))
    if save_dir:
        trainer.model.save_pretrained(save_dir, safe_serialization=True)
        tokenizer.save_pretrained(save_dir)
    return out


def _stage_for(stage: dict, method: str, steps: int, bf16: bool) -> dict:
    """The experiment's stage with the bench's method and step count, and no checkpoints."""
    import copy

    from ..config import LORA_DEFAULTS, QUANTIZATION_DEFAULTS

    stage = copy.deepcopy(stage)
    stage["method"] = method
    if method in ("lora", "qlora") and not stage.get("lora"):
        stage["lora"] = dict(LORA_DEFAULTS)
    if method == "qlora" and not stage.get("quantization"):
        stage["quantization"] = {**QUANTIZATION_DEFAULTS, "compute_dtype": "bfloat16" if bf16 else "float32"}
    stage["training"].update(
        max_steps=steps, save_strategy="no", eval_strategy="no", train_sampling_strategy="sequential"
    )
    if bf16:
        stage["training"]["bf16"] = True
    return stage


# --------------------------------------------------------------------------- the comparison (main process)


def compare_training(
    inputs,
    settings,
    run_task,
    methods=("lora", "full"),
    device: str = "cpu",
    model_dir: str | None = None,
    bf16: bool = False,
    log=print,
) -> dict:
    """{method: {side: [runs]}}: both sides per method, alternating which goes first each round.

    `run_task(task, **kwargs)` runs one side (worker.run_in_subprocess, or run_in_process for --quick).
    """
    model_dir = model_dir or inputs.model_dir
    results = {}
    for method in methods:
        runs: dict[str, list[dict]] = {"baseline": [], "ftflow": []}
        for round_index in range(settings.train_rounds):
            order = ("baseline", "ftflow") if round_index % 2 == 0 else ("ftflow", "baseline")
            for side in order:
                out_dir = os.path.join(inputs.work, "runs", f"{method}-{side}")
                common = dict(
                    model_dir=model_dir,
                    data_dir=inputs.data_dir,
                    stage=inputs.stage,
                    method=method,
                    steps=settings.train_steps,
                    out_dir=out_dir,
                    device=device,
                    bf16=bf16,
                )
                if side == "baseline":
                    run = run_task(
                        "train.baseline",
                        data_spec=inputs.data_spec,
                        workdir=inputs.work,
                        max_length=inputs.max_length,
                        **common,
                    )
                else:
                    run = run_task("train.ftflow", **common)
                log(
                    f"train {method} {side} round {round_index + 1}: {run['useful_tokens_per_second']:.1f} useful tokens/s, {run['timed_seconds']:.1f} s"
                )
                runs[side].append(run)
        results[method] = runs
    return results


def summarize_training(runs: dict, peak_gflops: float) -> dict:
    return {method: summarize_method(method_runs, peak_gflops) for method, method_runs in runs.items()}


def _median_run(runs: list[dict]) -> dict:
    ordered = sorted(runs, key=lambda r: r["useful_tokens_per_second"])
    return ordered[(len(ordered) - 1) // 2]


def summarize_method(runs: dict[str, list[dict]], peak_gflops: float) -> dict:
    sides = {}
    for side, side_runs in runs.items():
        run = _median_run(side_runs)
        seconds = run["timed_seconds"]
        sides[side] = {
            "useful_tokens_per_second": statistics.median(r["useful_tokens_per_second"] for r in side_runs),
            "real_tokens_per_second": statistics.median(r["real_tokens_per_second"] for r in side_runs),
            "timed_seconds": seconds,
            "timed_cpu_seconds": run["timed_cpu_seconds"],
            "wall_seconds": run["wall_seconds"],
            "pad_fraction": run["pad_fraction"],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in side_runs),
            "compute_efficiency": round(run["model_flops"] / seconds / (peak_gflops * 1e9), 4),
            "executed_efficiency": round(run["executed_flops"] / seconds / (peak_gflops * 1e9), 4),
            "model_gflops_per_second": round(run["model_flops"] / seconds / 1e9, 2),
            "runs": side_runs,
        }
        if "peak_gpu_mb" in run:
            sides[side]["peak_gpu_mb"] = max(r["peak_gpu_mb"] for r in side_runs)
    base, ours = sides["baseline"], sides["ftflow"]
    base_run, our_run = _median_run(runs["baseline"]), _median_run(runs["ftflow"])
    return {
        "speedup": round(ours["useful_tokens_per_second"] / base["useful_tokens_per_second"], 3),
        "compute_efficiency": ours["compute_efficiency"],
        # how much less ftflow executes for the same examples, and how fast each side executes:
        # speedup = work_ratio x rate_ratio
        "work_ratio": round(base_run["executed_flops"] / our_run["executed_flops"], 3),
        "rate_ratio": round(ours["executed_efficiency"] / base["executed_efficiency"], 3),
        "baseline": base,
        "ftflow": ours,
    }
