"""The LLaMA-Factory side of the peer comparison: `llamafactory-cli train` in its own virtualenv.

LLaMA-Factory 0.9.5 pins older transformers, datasets, peft and TRL than
ftflow's lock, so it gets a virtualenv of its own under the bench work folder,
built once (torch==2.13.0 first, so that the local CPU build is the one kept,
then llamafactory==0.9.5 with torch held to that pin) and reused; versions.json
in it lists what was installed and marks it complete.

Each run writes the job the way a LLaMA-Factory user would: the rows as a
`sharegpt`-formatted JSON file (OpenAI-style messages) with its
dataset_info.json entry, and a train YAML (stage sft, the experiment's LoRA
settings as lora_rank/lora_alpha/lora_dropout/lora_target, its optimizer and
schedule, `disable_shuffling` for the same order, no packing: padded batches,
LLaMA-Factory's default for SFT), then runs `llamafactory-cli train job.yaml`.
LLaMA-Factory saves its tokenized rows (`tokenized_path`), from which the
labelled positions are compared with ftflow's. Step times come from watching
its trainer_log.jsonl grow (one line per step with logging_steps 1), CPU
time from /proc, peak memory from the child's rusage.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time

from ..atomic import read_json, write_json, write_text
from ..errors import FtflowError
from ..model_setup import checkpoints_activations
from .peer_rows import compare_labels, peer_records
from .train_throughput import _example_counts, _examples, _shared_arguments

VERSION = "0.9.5"
TORCH = "2.13.0"  # ftflow's pin: the local CPU build, never replaced by the one LLaMA-Factory would pull
RECORDED = (
    "llamafactory",
    "torch",
    "torchaudio",
    "transformers",
    "datasets",
    "peft",
    "trl",
    "accelerate",
    "tokenizers",
)
TRAINER_LOG = "trainer_log.jsonl"
DATASET = "ftflow_rows"


# --------------------------------------------------------------------------- the virtualenv (built once)


def venv_python(root: str) -> str:
    return os.path.join(root, "venv", "bin", "python")


def ensure_venv(root: str, log=print) -> dict:
    """The versions installed in LLaMA-Factory's virtualenv under `root`, building it first if needed."""
    marker = os.path.join(root, "versions.json")
    if os.path.exists(marker):
        return read_json(marker)
    os.makedirs(root, exist_ok=True)
    log(f"llamafactory: building its virtualenv in {root} (once; several minutes)")
    constraints = os.path.join(root, "constraints.txt")
    write_text(constraints, f"torch=={TORCH}\n")
    python = venv_python(root)
    steps = [
        [sys.executable, "-m", "venv", os.path.join(root, "venv")],
        [python, "-m", "pip", "install", "--quiet", f"torch=={TORCH}"],
        [python, "-m", "pip", "install", "--quiet", "-c", constraints, f"llamafactory=={VERSION}"],
    ]
    # torchvision and torchaudio have no build for torch 2.13, and PyPI's are compiled against other torch builds:
    # their compiled operators fail to load. LLaMA-Factory's text SFT never calls them, but imports torchaudio
    # at the top of its multimodal plugin: torchvision goes (transformers then skips it), and torchaudio keeps
    # its Python modules without the compiled extension (torchaudio imports without one).
    steps.append([python, "-m", "pip", "uninstall", "--yes", "--quiet", "torchvision"])
    steps.append([python, "-c", _DROP_TORCHAUDIO_EXTENSION])
    steps.append([python, "-c", "import llamafactory.train.tuner"])  # the CLI's import chain works
    for command in steps:
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise FtflowError(f"llamafactory: `{' '.join(command)}` failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    listed = subprocess.run([python, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True)
    versions = {p["name"].lower(): p["version"] for p in json.loads(listed.stdout) if p["name"].lower() in RECORDED}
    if not versions.get("torch", "").startswith(TORCH):
        raise FtflowError(f"llamafactory: its virtualenv got torch {versions.get('torch')}, not {TORCH}")
    if "torchaudio" in versions:
        versions["torchaudio"] += " (compiled extension removed)"
    write_json(marker, versions)
    return versions


_DROP_TORCHAUDIO_EXTENSION = """
import glob, importlib.util, os
spec = importlib.util.find_spec("torchaudio")
if spec:
    for path in glob.glob(os.path.join(os.path.dirname(spec.origin), "lib", "*.so")):
        os.remove(path)
"""


# --------------------------------------------------------------------------- the job files


def template_name(chat_template: str | None) -> str:
    """LLaMA-Factory's registered template for the model's chat template."""
    text = chat_template or ""
    if "SmolLM" in text:
        return "smollm2"
    if "<|im_start|>" in text and "Qwen" in text:
        return "qwen3" if "<think>" in text else "qwen"
    if "<|im_start|>" in text:
        return "chatml"
    raise FtflowError(
        "llamafactory: no LLaMA-Factory template is known for this model's chat template; the bench maps SmolLM2, "
        "Qwen and ChatML templates"
    )


def lora_target(target_modules) -> str:
    if target_modules in ("all-linear", None):
        return "all"
    return target_modules if isinstance(target_modules, str) else ",".join(target_modules)


def job_settings(
    model_dir: str,
    dataset_dir: str,
    template: str,
    stage: dict,
    method: str,
    steps: int,
    max_length: int,
    output_dir: str,
    tokenized_path: str,
) -> dict:
    """The train YAML: the experiment's settings in LLaMA-Factory's names."""
    training = stage["training"]
    checkpointing = checkpoints_activations(training)
    settings = {
        "model_name_or_path": model_dir,
        "trust_remote_code": False,
        "stage": "sft",
        "do_train": True,
        "finetuning_type": method,
        "dataset": DATASET,
        "dataset_dir": dataset_dir,
        "template": template,
        "cutoff_len": max_length,
        "overwrite_cache": True,
        "tokenized_path": tokenized_path,
        "output_dir": output_dir,
        "overwrite_output_dir": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "plot_loss": False,
        "report_to": "none",
        "per_device_train_batch_size": int(training["per_device_train_batch_size"]),
        "max_steps": steps,
        "disable_shuffling": True,  # the rows in file order, as every side
        "bf16": False,
        "fp16": False,
        # LLaMA-Factory turns activation checkpointing on unless told not to (it ignores the Trainer's flag):
        # the stage's setting, as on every side
        "disable_gradient_checkpointing": not checkpointing,
        "gradient_checkpointing": checkpointing,
        **_shared_arguments(stage),
    }
    if method == "lora":
        lora = stage["lora"]
        settings.update(
            lora_rank=int(lora["r"]),
            lora_alpha=int(lora["lora_alpha"]),
            lora_dropout=float(lora.get("lora_dropout", 0.0)),
            lora_target=lora_target(lora.get("target_modules")),
        )
    return settings


def write_job(job_dir: str, records: list[dict], settings: dict) -> str:
    """rows.json, dataset_info.json and job.yaml in `job_dir`; the YAML's path."""
    import yaml

    os.makedirs(job_dir, exist_ok=True)
    rows = [{"messages": r["prompt"] + r["completion"]} for r in records]
    write_json(os.path.join(job_dir, "rows.json"), rows)
    info = {
        DATASET: {
            "file_name": "rows.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        }
    }
    write_json(os.path.join(job_dir, "dataset_info.json"), info)
    path = os.path.join(job_dir, "job.yaml")
    write_text(path, yaml.safe_dump(settings, sort_keys=False))
    return path


# --------------------------------------------------------------------------- one run (worker side)


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process, all threads (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _watch(proc, log_path: str, poll: float = 0.05) -> dict[int, tuple[float, float | None]]:
    """{step: (wall time, CPU time) when its line appeared in trainer_log.jsonl}, until the process ends."""
    seen: dict[int, tuple[float, float | None]] = {}
    offset = 0
    while True:
        done = proc.poll() is not None
        if os.path.exists(log_path):
            with open(log_path, encoding="utf-8") as handle:
                handle.seek(offset)
                chunk = handle.read()
            complete = chunk[: chunk.rfind("\n") + 1]
            offset += len(complete.encode("utf-8"))
            now, cpu = time.perf_counter(), _cpu_seconds(proc.pid)
            for line in complete.splitlines():
                entry = json.loads(line)
                if entry.get("loss") is not None and entry["current_steps"] not in seen:
                    seen[entry["current_steps"]] = (now, cpu)
        if done:
            return seen
        time.sleep(poll)


def _read_log(log_path: str) -> list[dict]:
    with open(log_path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def run_llamafactory_side(
    model_dir: str,
    data_dir: str,
    data_spec: str,
    workdir: str,
    stage: dict,
    method: str,
    steps: int,
    out_dir: str,
    venv: str,
    max_length: int,
    save_dir: str | None = None,
) -> dict:
    """`llamafactory-cli train` on ftflow's first `steps x batch` rows; timings, losses, peak RSS, and the
    trained adapter or model in save_dir."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    versions = read_json(os.path.join(venv, "versions.json"))  # the bench built it before any run
    per_step = int(stage["training"]["per_device_train_batch_size"]) * int(
        _shared_arguments(stage).get("gradient_accumulation_steps", 1)
    )
    examples = _examples(data_dir, steps * per_step)
    lengths, useful = _example_counts(examples)
    kind, records = peer_records(data_spec, workdir, list(examples["source_row"]))
    if kind != "chat":
        raise FtflowError("bench: the LLaMA-Factory side runs chat rows only")
    template = template_name(AutoTokenizer.from_pretrained(model_dir).chat_template)
    shutil.rmtree(out_dir, ignore_errors=True)
    output_dir = save_dir or os.path.join(out_dir, "output")
    shutil.rmtree(output_dir, ignore_errors=True)  # an earlier run's trainer_log.jsonl would be read as this one's
    tokenized = os.path.join(out_dir, "tokenized")
    settings = job_settings(model_dir, out_dir, template, stage, method, steps, max_length, output_dir, tokenized)
    job = write_job(out_dir, records, settings)
    cli = os.path.join(venv, "venv", "bin", "llamafactory-cli")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": ""}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    started = time.perf_counter()
    with open(os.path.join(out_dir, "train.log"), "w", encoding="utf-8") as out:
        proc = subprocess.Popen([cli, "train", job], stdout=out, stderr=subprocess.STDOUT, cwd=out_dir, env=env)
        stamps = _watch(proc, os.path.join(output_dir, TRAINER_LOG))
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        with open(os.path.join(out_dir, "train.log"), encoding="utf-8") as handle:
            tail = handle.read()[-4000:]
        raise FtflowError(f"llamafactory: `llamafactory-cli train {job}` failed (exit {proc.returncode}):\n{tail}")
    peak_mb = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    with open(os.path.join(out_dir, "train.log"), encoding="utf-8") as handle:
        checkpointed = "Gradient checkpointing enabled" in handle.read()
    if checkpointed != settings["gradient_checkpointing"]:  # another job than every other side's
        raise FtflowError(
            f"llamafactory: activation checkpointing was {'on' if checkpointed else 'off'} in {out_dir}/train.log, "
            f"the stage says {'on' if settings['gradient_checkpointing'] else 'off'}"
        )
    if len(stamps) < 2 or 1 not in stamps or steps not in stamps:
        raise FtflowError(f"llamafactory: expected a loss line per step in {output_dir}/{TRAINER_LOG}")
    seconds = stamps[steps][0] - stamps[1][0]
    if seconds <= 0:
        raise FtflowError(f"llamafactory: steps 1 to {steps} of {output_dir}/{TRAINER_LOG} appeared at the same time")
    cpu = None
    if stamps[steps][1] is not None and stamps[1][1] is not None:
        cpu = round(stamps[steps][1] - stamps[1][1], 3)
    timed = slice(per_step, steps * per_step)
    theirs = load_from_disk(tokenized)
    theirs = theirs["train"] if hasattr(theirs, "keys") else theirs
    ours = [{"input_ids": i, "labels": lab} for i, lab in zip(examples["input_ids"], examples["labels"])]
    losses = [e["loss"] for e in _read_log(os.path.join(output_dir, TRAINER_LOG)) if e.get("loss") is not None]
    return {
        "side": "llamafactory",
        "method": method,
        "steps": steps,
        "examples": len(lengths),
        "examples_per_step": per_step,
        "wall_seconds": round(wall, 3),
        "timed_steps": steps - 1,
        "timed_seconds": round(seconds, 3),
        "timed_cpu_seconds": cpu,
        "tokens": {"real": sum(lengths[timed]), "useful": sum(useful[timed])},
        "useful_tokens_per_second": round(sum(useful[timed]) / seconds, 2),
        "real_tokens_per_second": round(sum(lengths[timed]) / seconds, 2),
        "losses": losses,
        "peak_rss_mb": peak_mb,
        "labels": compare_labels(ours, [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in theirs]),
        "template": template,
        "versions": versions,
    }
