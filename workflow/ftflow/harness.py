"""The harness job: lm-evaluation-harness benchmarks of one model, written to eval/harness.json.

`lm_eval.simple_evaluate` runs the experiment's tasks (eval.harness) on its
merged model, loaded here and handed to the harness's HFLM as a model object
(so the harness never resolves the folder as a hub id, and the model sits on
the job's device). Each task is loaded once before the model: a hub task
that cannot be reached offline fails the job with one line naming the task
and what to set, before any time is spent on the others.

A model folder that holds no model (its run diverged or failed, status.py)
is not loaded: harness.json records that status and why, with no tasks.

The output, per task: every metric with its standard error, the main metric
(the task's first), the number of examples scored, n-shot, the task version,
plus the harness version, the settings and ftflow's provenance.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
import time

from .atomic import write_json
from .errors import FtflowError
from .provenance import provenance
from .specs import HarnessSpec
from .status import read_status, status_reason

log = logging.getLogger(__name__)
HUB_HINT = (
    "the hub is out of reach: set HF_ENDPOINT to a mirror, or hf_home to a cache that holds the dataset, "
    "or use a local task YAML (dataset_path: json, dataset_kwargs.data_files)"
)


def run_harness(spec_path: str, model_dir: str, out: str, stage: str | None = None) -> dict:
    """Benchmark the model in `model_dir` on the spec's tasks; write `out` (atomically) and return it."""
    spec = HarnessSpec.read(spec_path)
    who = f"experiment {spec.experiment!r}" + (f", after stage {stage!r}" if stage else "")
    status = read_status(model_dir)
    if status != "ok":  # diverged or failed upstream (a search's trial, say): no model to benchmark
        result = {
            "experiment": spec.experiment,
            "stage": stage,
            "model_dir": model_dir,
            "status": status,
            "reason": status_reason(model_dir),
            "tasks": {},
            "provenance": {**provenance(spec.config_hash), "harness_hash": spec.harness_hash},
        }
        write_json(out, result)
        return result
    started = time.perf_counter()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    task_manager = make_task_manager(spec)
    check_tasks_load(spec, task_manager, who)
    model, tokenizer = load_model(model_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size)
    raw = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(spec.tasks),
        num_fewshot=spec.num_fewshot,
        limit=spec.limit,
        apply_chat_template=spec.apply_chat_template,
        task_manager=task_manager,
        log_samples=False,
        bootstrap_iters=1000,
    )
    if raw is None:  # a non-zero rank of a distributed run; this job is one process
        raise FtflowError(f"{who}: lm-evaluation-harness returned no results")
    result = {
        "experiment": spec.experiment,
        "stage": stage,
        "model_dir": model_dir,
        "status": "ok",
        "tasks": summarize(raw),
        "settings": {
            "tasks": list(spec.tasks),
            "num_fewshot": spec.num_fewshot,
            "limit": spec.limit,
            "batch_size": spec.batch_size,
            "apply_chat_template": spec.apply_chat_template,
        },
        "harness_version": importlib.metadata.version("lm_eval"),
        "seconds": round(time.perf_counter() - started, 1),
        "provenance": {**provenance(spec.config_hash), "harness_hash": spec.harness_hash},
    }
    write_json(out, result)
    return result


def make_task_manager(spec: HarnessSpec):
    """The harness's task index; without its built-in tasks (seconds to index) when every task is a local YAML."""
    from lm_eval.tasks import TaskManager

    if all(spec.is_local_task(task) for task in spec.tasks):
        folders = sorted({os.path.dirname(os.path.abspath(task)) for task in spec.tasks})
        return TaskManager(include_path=folders, include_defaults=False)
    return TaskManager()


def check_tasks_load(spec: HarnessSpec, task_manager, who: str) -> None:
    """Build each task (which loads its data) before the model: one line for the first that fails."""
    for task in spec.tasks:
        try:
            task_manager.load([task])
        except KeyError as err:  # the harness's word for a name it does not know
            raise FtflowError(
                f"{who}: unknown harness task {task!r} ({str(err).strip(chr(34))}); "
                "a task or group name of lm-eval's index, or a local task YAML (*.yaml)"
            ) from None
        except Exception as err:  # `datasets` raises many kinds; the first line says which
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            hint = HUB_HINT if isinstance(err, (ConnectionError, OSError)) else "check the task's YAML"
            raise FtflowError(f"{who}: harness task {task!r} failed to load its data ({reason}); {hint}") from None


def load_model(model_dir: str):
    """The merged model in eval mode on the job's device (the first visible GPU, else the CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    log.info("loaded %s on %s (%s)", model_dir, device, dtype)
    return model, tokenizer


def summarize(raw: dict) -> dict:
    """Per task (and group): {metrics: {name: {value, stderr}}, main, higher_is_better, examples, n_shot, version}."""
    tasks = {}
    results = {**raw.get("results", {}), **raw.get("groups", {})}
    for task, values in results.items():
        metrics = {}
        for key, value in values.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, _, filter_name = key.partition(",")
            name = metric if filter_name == "none" else f"{metric}[{filter_name}]"
            stderr = values.get(f"{metric}_stderr,{filter_name}")
            metrics[name] = {"value": _number(value), "stderr": _number(stderr)}
        if not metrics:
            continue
        samples = (raw.get("n-samples") or {}).get(task) or {}
        config = (raw.get("configs") or {}).get(task) or {}
        tasks[task] = {
            "metrics": metrics,
            "main": main_metric(config, metrics),
            "higher_is_better": (raw.get("higher_is_better") or {}).get(task) or {},
            "examples": samples.get("effective"),
            "examples_in_task": samples.get("original"),
            "n_shot": (raw.get("n-shot") or {}).get(task),
            "version": (raw.get("versions") or {}).get(task),
            "alias": values.get("alias", task),
        }
    return tasks


def main_metric(config: dict, metrics: dict) -> str:
    """The number a report column shows: the task's first listed metric, else its first reported one."""
    for entry in config.get("metric_list") or []:
        name = entry.get("metric") if isinstance(entry, dict) else None
        matches = [m for m in metrics if m == name or m.startswith(f"{name}[")]
        if matches:
            return matches[0]
    return next(iter(metrics))


def _number(value):
    """A metric as JSON can hold it: NaN and "N/A" stderr (one example) become None."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    return None if math.isnan(value) or math.isinf(value) else float(value)
