"""ftflow against the tools a user would pick instead: TRL's SFTTrainer and LLaMA-Factory.

The job is the measured experiment itself (the embedded default's lora-r16:
its rows, LoRA settings, optimizer, schedule, batch and steps), trained once
with LoRA and once fully, by every side:

    ftflow        train_throughput.run_ftflow_path (what `ftflow train` builds)
    trl           trl_side.run_trl_side (SFTTrainer, padding_free=True)
    llamafactory  llamafactory_side.run_llamafactory_side (`llamafactory-cli train` in
                  its own virtualenv under bench/work/, built once)

Each run is a fresh process; the sides rotate which goes first every round and
the medians are reported. Each side's first-round artifact is then merged and
scored by ftflow's own evaluator (score_side): eval loss on the validation
rows, exact match and field accuracy on the test rows, the same computation
for every side. The tokens/s numerator is the same for every side (the
assistant tokens of the timed steps' examples), so a ratio compares work done.
"""

from __future__ import annotations

import copy
import os
import statistics

from ..errors import FtflowError

SIDES = ("ftflow", "trl", "llamafactory")
TASKS = {"ftflow": "train.ftflow", "trl": "peers.trl", "llamafactory": "peers.llamafactory"}


def peer_stage(stage: dict) -> dict:
    """The experiment's stage, logging the loss at every step."""
    stage = copy.deepcopy(stage)
    stage["training"]["logging_steps"] = 1
    return stage


def rotation(sides: tuple[str, ...], round_index: int) -> tuple[str, ...]:
    """Round k starts with side k (mod n) and goes on in order: over n rounds each side goes first once."""
    shift = round_index % len(sides)
    return sides[shift:] + sides[:shift]


def compare_peers(inputs, steps: int, rounds: int, run_task, sides=SIDES, methods=("lora", "full"), log=print) -> dict:
    """{method: {side: {"runs": [...], "score": {...}}}} for every side and method."""
    stage = peer_stage(inputs.stage)
    root = os.path.join(inputs.work, "peers")
    results: dict = {}
    for method in methods:
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        artifacts: dict[str, str] = {}
        for round_index in range(rounds):
            for side in rotation(tuple(sides), round_index):
                out_dir = os.path.join(root, f"{method}-{side}")
                save_dir = os.path.join(root, f"{method}-{side}-artifact") if round_index == 0 else None
                common = dict(
                    model_dir=inputs.model_dir,
                    data_dir=inputs.data_dir,
                    stage=stage,
                    method=method,
                    steps=steps,
                    out_dir=out_dir,
                    save_dir=save_dir,
                )
                if side != "ftflow":
                    common.update(data_spec=inputs.data_spec, workdir=inputs.work)
                if side == "llamafactory":
                    common.update(venv=os.path.join(inputs.work, "llamafactory"), max_length=inputs.max_length)
                run = run_task(TASKS[side], **common)
                if save_dir:
                    artifacts[side] = save_dir
                log(
                    f"peers {method} {side} round {round_index + 1}: {run['useful_tokens_per_second']:.1f} useful "
                    f"tokens/s, final loss {run['losses'][-1]:.6f}, peak RSS {run['peak_rss_mb']:.0f} MB"
                )
                runs[side].append(run)
        results[method] = {}
        for side in sides:
            score = run_task(
                "peers.score",
                base_dir=inputs.model_dir,
                artifact_dir=artifacts[side],
                method=method,
                merged_dir=os.path.join(root, f"{method}-{side}-merged"),
                data_dir=inputs.eval_data_dir,
                eval_spec=inputs.eval,
            )
            shown = {k: v for k, v in (score.get("metrics") or {}).items() if not isinstance(v, dict)}
            log(f"peers {method} {side} scored: eval loss {score['eval_loss']:.6f}, {shown}")
            results[method][side] = {"runs": runs[side], "score": score}
    return results


def score_side(base_dir: str, artifact_dir: str, method: str, merged_dir: str, data_dir: str, eval_spec: dict) -> dict:
    """A side's trained adapter (merged onto the base) or model, scored by ftflow's evaluator: eval loss on
    the eval loss split, task metrics on the eval split's generated answers."""
    import torch

    from ..evaluation import generate, generation_split, load_for_eval, score, split_loss
    from ..merge import merge_adapter
    from ..specs import EvalSpec

    if method == "lora":
        if not os.path.exists(os.path.join(merged_dir, "config.json")):
            merge_adapter(base_dir, artifact_dir, merged_dir, torch.float32)
        model_dir = merged_dir
    else:
        model_dir = artifact_dir
    spec = EvalSpec.from_json(eval_spec)
    torch.manual_seed(0)
    model, tokenizer = load_for_eval(model_dir, "cpu")
    out = split_loss(model, data_dir, spec, "cpu")
    test = generation_split(data_dir, spec)
    if test is not None:
        record, _, predictions = generate(model, tokenizer, test, spec, "cpu")
        out["metrics"], _ = score("bench", spec.metrics, predictions, list(test["reference"]))
        out["generation_examples"] = record["examples"]
    return out


def _median(values, digits: int = 4):
    return round(statistics.median(values), digits)


def summarize_side(side: dict) -> dict:
    runs = side["runs"]
    losses = [run["losses"] for run in runs]
    return {
        "useful_tokens_per_second": _median([r["useful_tokens_per_second"] for r in runs]),
        "useful_tokens_per_second_runs": [r["useful_tokens_per_second"] for r in runs],
        "timed_cpu_seconds": _median([r["timed_cpu_seconds"] for r in runs]),
        "peak_rss_mb": _median([r["peak_rss_mb"] for r in runs]),
        "peak_rss_mb_runs": [r["peak_rss_mb"] for r in runs],
        "final_train_loss": _median([loss[-1] for loss in losses], 6),
        "losses": losses[0],  # every step of the first run (the scored one)
        "eval_loss": side["score"].get("eval_loss"),
        "metrics": side["score"].get("metrics", {}),
        "labels": runs[0].get("labels"),
        "versions": runs[0].get("versions"),
    }


def summarize_peers(results: dict) -> dict:
    """Per method: every side's medians, and per peer the ratios to ftflow (speedup > 1: ftflow faster;
    memory_ratio < 1: ftflow smaller; gaps are ftflow's value minus the peer's)."""
    out: dict = {"sides": {}}
    for method, sides in results.items():
        summary = {side: summarize_side(value) for side, value in sides.items()}
        out["sides"][method] = summary
        ours = summary.get("ftflow")
        if ours is None:
            raise FtflowError("bench: the peer comparison needs the ftflow side")
        for peer, theirs in summary.items():
            if peer == "ftflow":
                continue
            eval_gap = None
            if ours["eval_loss"] is not None and theirs["eval_loss"] is not None:
                eval_gap = round(ours["eval_loss"] - theirs["eval_loss"], 6)
            out.setdefault(peer, {})[method] = {
                "speedup": round(ours["useful_tokens_per_second"] / theirs["useful_tokens_per_second"], 3),
                "memory_ratio": round(ours["peak_rss_mb"] / theirs["peak_rss_mb"], 3),
                "loss_gap": round(ours["final_train_loss"] - theirs["final_train_loss"], 6),
                "eval_loss_gap": eval_gap,
            }
    return out


def bench_peers(inputs, settings, run_task, log=print, command=None, steps=None, rounds=None) -> dict:
    """The peer comparison as results.json's `peers`: the experiment's own step count (2 in quick mode),
    two rounds (one in quick mode). Quick mode leaves LLaMA-Factory out (its virtualenv takes minutes to build);
    a full run builds it once under the bench work folder."""
    import time

    from .llamafactory_side import ensure_venv

    started = time.perf_counter()
    training = inputs.stage["training"]
    steps = steps or (2 if settings.quick else int(training.get("max_steps") or settings.train_steps))
    rounds = rounds or (1 if settings.quick else 2)
    sides, skipped = ["ftflow", "trl"], {}
    if settings.quick:
        skipped["llamafactory"] = "quick mode: its virtualenv is built only by a full run"
    else:
        try:
            ensure_venv(os.path.join(inputs.work, "llamafactory"), log=log)
            sides.append("llamafactory")
        except FtflowError as err:  # said out loud in results.md, the other sides still compared
            skipped["llamafactory"] = str(err).splitlines()[0]
            log(f"peers: LLaMA-Factory left out: {skipped['llamafactory']}")
    load_start = [round(x, 2) for x in os.getloadavg()]
    results = compare_peers(inputs, steps, rounds, run_task, sides=tuple(sides), log=log)
    out = {
        "command": command,
        "steps": steps,
        "rounds": rounds,
        "examples_per_step": int(training["per_device_train_batch_size"])
        * int(training.get("gradient_accumulation_steps", 1)),
        "load_average_start": load_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.perf_counter() - started, 1),
        "skipped": skipped,
        **summarize_peers(results),
    }
    first = next(iter(out["sides"].values()))
    out["versions"] = {side: info["versions"] for side, info in first.items() if info.get("versions")}
    return out
