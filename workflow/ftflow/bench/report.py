"""bench/results.md: the tables, the definitions behind them, and the targets."""

from __future__ import annotations

from .flops import __doc__ as FLOP_ACCOUNTING
from .peers_report import render_peers


def _num(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _machine_line(results: dict) -> str:
    m = results["machine"]
    parts = [m.get("cpu") or "unknown CPU", f"{m['cpu_count']} cores", f"{m['torch_threads']} torch threads"]
    if m.get("memory_gib"):
        parts.append(f"{m['memory_gib']} GiB RAM")
    parts.append(f"GPU: {m['gpu']}" if m.get("gpu") else "no GPU")
    return ", ".join(parts)


def _targets(results: dict) -> list[str]:
    rows = []
    for t in results["targets"]:
        sign = "≥" if t["direction"] == "at least" else "≤"
        value = _pct(t["value"]) if "efficiency" in t["key"] else _num(float(t["value"]))
        goal = _pct(t["goal"]) if "efficiency" in t["key"] else _num(float(t["goal"]), 1)
        if t["met"]:
            verdict = "met"
        elif t["direction"] == "at least":
            verdict = f"missed: {t['value'] / t['goal']:.0%} of the goal"
        else:
            verdict = f"missed: {t['value'] / t['goal']:.2f}x the limit"
        rows.append([t["meaning"], f"{sign} {goal}", value, verdict])
    return _table(["target", "goal", "measured", "verdict"], rows)


def _shortfalls(results: dict) -> list[str]:
    """Why each missed target was missed, from the measurements themselves."""
    notes = []
    missed = {t["key"] for t in results["targets"] if not t["met"]}
    train = results["train"]
    for method in ("lora", "full"):
        if f"train.{method}.speedup" in missed:
            r = train[method]
            notes.append(
                f"- {method} speedup: ftflow does {r['work_ratio']:.2f}x less work than the padded recipe on these examples "
                f"(pad fraction {_pct(r['baseline']['pad_fraction'])}, LM head only on labelled positions) and runs it at "
                f"{r['rate_ratio']:.2f}x the recipe's FLOP rate; at equal rates the speedup is the work ratio, so reaching 4x "
                "needs shorter examples relative to max_length, or ftflow's FLOPs running faster than the recipe's large padded matmuls."
            )
    if "train.lora.compute_efficiency" in missed:
        r = train["lora"]
        notes.append(
            f"- LoRA compute efficiency: ftflow's useful FLOP rate is {_pct(r['ftflow']['compute_efficiency'])} of the matmul peak; "
            f"the recipe keeps the cores {_pct(r['baseline']['executed_efficiency'])} busy with its larger matmuls, of which "
            f"{_pct(r['baseline']['compute_efficiency'])} is useful. The rest of a step is not matmuls: LoRA dropout's random "
            "masks, norms, activations, attention, the optimizer."
        )
    if "eval.speedup" in missed:
        e = results["eval"]
        single, batched = e["one_at_a_time"], e["batched"]
        notes.append(
            f"- eval speedup: one prompt at a time decodes {single['new_tokens'] / single['seconds']:.1f} answer tokens/s, "
            f"batches of up to {e['batch_size']} decode {batched['new_tokens'] / batched['seconds']:.1f}; "
            "a batch keeps decoding until its longest answer ends."
        )
    if "dag.seconds.500" in missed:
        d = results["dag"]
        floor = f"; a trivial Snakefile with as many jobs takes {d['floor']['seconds']:.1f} s" if d.get("floor") else ""
        notes.append(
            f"- dry run: {d['seconds']['500']:.1f} s for 500 experiments, of which ftflow's own resolution is {d['resolve']['500']['resolve_seconds']:.2f} s{floor}."
        )
    return notes + [""] if notes else []


def _training(results: dict) -> list[str]:
    train = results["train"]
    lines = []
    rows = []
    for method in ("lora", "full"):
        for side, label in (("baseline", "padded recipe"), ("ftflow", "ftflow")):
            s = train[method][side]
            rows.append(
                [
                    method,
                    label,
                    _num(s["useful_tokens_per_second"], 1),
                    _num(s["real_tokens_per_second"], 1),
                    _pct(s["pad_fraction"]),
                    _num(s["timed_seconds"]),
                    _num(s["timed_cpu_seconds"]),
                    _num(s["wall_seconds"]),
                    _num(s["peak_rss_mb"], 0),
                    _pct(s["compute_efficiency"]),
                    _pct(s["executed_efficiency"]),
                ]
            )
    header = [
        "method",
        "side",
        "useful tokens/s",
        "real tokens/s",
        "pad fraction",
        "timed s",
        "CPU s",
        "wall s",
        "peak RSS MB",
        "compute efficiency",
        "executed efficiency",
    ]
    lines += _table(header, rows)
    for method in ("lora", "full"):
        r = train[method]
        lines.append(
            f"- **{method}: {r['speedup']:.2f}x** useful tokens/s. ftflow executes {r['work_ratio']:.2f}x fewer FLOPs for the same "
            f"examples and runs them at {r['rate_ratio']:.2f}x the baseline's FLOP rate (speedup = work ratio x rate ratio)."
        )
    lines.append("")
    steps, per_step = train["steps"], train["examples_per_step"]
    recipe_run = train["lora"]["baseline"]["runs"][0]
    lines += [
        f"The recipe's own tokenization (`padding=\"max_length\"`) gives the same tokens as ftflow's for "
        f"{recipe_run['identical_token_examples']} of {recipe_run['examples']} examples before its padding.",
        "",
    ]
    lines += [
        f"Each run: {steps} optimizer steps of {per_step} examples (the first {steps * per_step} of the tokenized train split, in order, "
        f"the same on both sides); the first step is a warm-up, the other {steps - 1} are timed. Sides alternate which goes first "
        f"over {results['settings']['train_rounds']} round(s), each run in a fresh process; the table shows the median run.",
        "",
        "- **useful tokens**: tokens that carry a label in ftflow's task definition, here the assistant answers "
        "(each example's first token excluded: nothing predicts it). The baseline recipe labels every non-pad token, "
        "prompts included; its useful tokens are counted on the same examples' assistant tokens, so both sides share one numerator.",
        "- **real tokens**: the examples' tokens without padding; **pad fraction**: pad positions / positions the model computed.",
        "- **timed s**: wall time of the timed steps; **CPU s**: the process's CPU time over them (all threads; on a busy "
        "machine it still follows the work done, where wall time does not); **wall s**: `trainer.train()` from start to end, "
        "warm-up step included.",
        "- **compute efficiency**: model FLOPs of the timed steps (the work the examples need: every real token forward and "
        "backward, the LM head only at positions that predict a label) per second, divided by the measured fp32 matmul peak. "
        "**executed efficiency**: the FLOPs the side actually ran (pad positions, and the LM head at every position for the "
        "baseline) per second over the same peak: how busy each side keeps the cores.",
        "",
        "FLOP accounting (`workflow/ftflow/bench/flops.py`):",
        "",
        "```",
        *[line for line in (FLOP_ACCOUNTING or "").strip().splitlines()],
        "```",
        "",
    ]
    return lines


def _packing(results: dict) -> list[str]:
    rows = []
    for method in ("lora", "full"):
        for side, label in (("baseline", "pad every example to max_length"), ("ftflow", "packed, no padding")):
            s = results["train"][method][side]
            rows.append([method, label, _pct(s["pad_fraction"]), _num(s["real_tokens_per_second"], 1)])
    return _table(["method", "batches", "pad fraction", "real tokens/s"], rows)


def _generation(results: dict) -> list[str]:
    e = results["eval"]
    rows = [
        [
            "one prompt at a time",
            _num(e["one_at_a_time"]["examples_per_second"], 3),
            _num(e["one_at_a_time"]["seconds"]),
            _num(e["one_at_a_time"]["new_tokens"]),
        ],
        [
            f"ftflow batched (batch {e['batch_size']})",
            _num(e["batched"]["examples_per_second"], 3),
            _num(e["batched"]["seconds"]),
            _num(e["batched"]["new_tokens"]),
        ],
    ]
    return _table(["decoding", "examples/s", "seconds", "new tokens"], rows) + [
        f"**{e['speedup']:.2f}x** examples/s; **{e['identical']} of {e['examples']}** answers identical token for token "
        f"(greedy, up to {e['max_new_tokens']} new tokens, the same stop tokens on both sides; {e['hit_max_new_tokens']} "
        f"answers reached max_new_tokens). The model is {results['inputs']['experiment']}'s merged model, the one its eval step "
        "decodes with. Batched fp32 matmuls sum in a different order than single-row ones, so a near-tie between two tokens "
        "can flip an answer.",
        "",
    ]


def _dag(results: dict) -> list[str]:
    d = results["dag"]
    rows = []
    for size, seconds in d["seconds"].items():
        resolve = d["resolve"][size]
        rows.append(
            [
                f"{resolve['experiments']:,}",
                _num(d["jobs"][size]),
                _num(seconds),
                _num(d["repeat_seconds"][size]),
                _num(resolve["command_seconds"]),
                _num(resolve["resolve_seconds"], 3),
            ]
        )
    lines = _table(
        [
            "experiments",
            "jobs",
            "`snakemake -n` first run, s",
            "repeat, s",
            "`ftflow resolve`, s",
            "of which resolving, s",
        ],
        rows,
    )
    growth = d["growth"]
    marginal = ", ".join(f"{k}: {v * 1000:.1f} ms" for k, v in growth["marginal_seconds_per_experiment"].items())
    lines.append(
        f"Marginal cost per experiment between sizes: {marginal}"
        + (f" (ratio {growth['marginal_ratio']:.2f}: 1 is linear)." if "marginal_ratio" in growth else ".")
    )
    if d.get("floor"):
        lines.append(
            f"Floor: a trivial Snakefile with {d['floor']['jobs']:,} jobs (3 chained `touch` rules) takes {d['floor']['seconds']:.2f} s to dry-run."
        )
    lines += ["The first run of each size writes every experiment's config.json; repeats find them unchanged.", ""]
    return lines


def _tokenization(results: dict) -> list[str]:
    t = results["tokenize"]
    rows = [
        [
            kind,
            _num(k["rows"]),
            _num(k["tokens"]),
            _num(k["seconds"]),
            _num(k["rows_per_second"], 0),
            _num(k["tokens_per_second"], 0),
        ]
        for kind, k in t["kinds"].items()
    ]
    hit = t["cache_hit"]
    return _table(["kind", "rows", "tokens", "seconds", "rows/s", "tokens/s"], rows) + [
        "One process (`num_proc` 1), the same generated rows for every kind, the embedded tokenizer; seconds include reading the "
        "rows and saving the `datasets` folders.",
        "",
        f"Cache hit: `snakemake` for the bench's tokenized data, already present, plans no tokenize job and takes "
        f"{hit['run_seconds']:.2f} s (dry run {hit['dry_run_seconds']:.2f} s); the tokenize job it skips took {_num(hit['tokenize_job_seconds'])} s when it ran.",
        "",
    ]


def _gpu(results: dict) -> list[str]:
    g = results["gpu"]
    if g.get("skipped"):
        return [
            f"Not measured: {g['skipped']}. With CUDA, `ftflow bench --gpu` trains a random-initialised Qwen3-0.6B-shaped model in bf16 "
            "(full, LoRA, QLoRA; padded recipe vs ftflow) and reports useful tokens/s and peak GPU memory.",
            "",
        ]
    rows = []
    for method, r in g["train"].items():
        for side in ("baseline", "ftflow"):
            s = r[side]
            rows.append(
                [
                    method,
                    side,
                    _num(s["useful_tokens_per_second"], 0),
                    _pct(s["pad_fraction"]),
                    _num(s.get("peak_gpu_mb"), 0),
                    _pct(s["compute_efficiency"]),
                ]
            )
        rows.append([method, "speedup", f"{r['speedup']:.2f}x", "", "", ""])
        trl = (g.get("trl") or {}).get(method)
        if trl:
            rows.append(
                [
                    method,
                    "TRL SFTTrainer",
                    _num(trl["useful_tokens_per_second"], 0),
                    "0%",
                    _num(trl["peak_gpu_mb"], 0),
                    "",
                ]
            )
            rows.append([method, "ftflow / TRL", f"{trl['speedup']:.2f}x", "", _num(trl["memory_ratio"], 2), ""])
    return [
        f"{g['model']} on {results['machine'].get('gpu', g['device'])}; bf16 matmul peak {g['matmul_peak']['gflops']:,.0f} GFLOP/s; {g['steps']} steps per run.",
        "",
    ] + _table(
        ["method", "side", "useful tokens/s", "pad fraction", "peak GPU MB", "compute efficiency (bf16 peak)"], rows
    )


def render_markdown(results: dict) -> str:
    peak = results["matmul_peak"]
    load = results.get("load_average_start"), results.get("load_average_end")
    lines = [
        "# ftflow benchmarks",
        "",
        f"`{results['command']}` on {_machine_line(results)}; {results['date']}, commit {results['provenance']['git_commit'] or 'unknown'}, {results['seconds']:.0f} s.",
        f"fp32 matmul peak {peak['gflops']:.1f} GFLOP/s (best of {peak['repeats']} {peak['matrix']}x{peak['matrix']} matmuls, "
        f"measured before and after training: {', '.join(f'{g:.1f}' for g in peak['measurements_gflops'])}). "
        f"Load average (1/5/15 min) at start {load[0]}, at end {load[1]}: timings are only comparable on an otherwise idle machine.",
        "",
    ]
    if results["quick"]:
        lines += [
            "**Quick mode** (CI): the tiny random stand-in model, a few steps and rows, every side in one process. These numbers check that the benchmark runs; they say nothing about speed.",
            "",
        ]
    lines += ["## Targets", ""] + _targets(results) + _shortfalls(results)
    lines += [
        f"## Training throughput: {results['inputs']['model']} ({results['inputs']['experiment']}'s data and settings)",
        "",
    ] + _training(results)
    lines += ["## Packed vs padded batches", ""] + _packing(results)
    lines += ["## Generation for eval (test split)", ""] + _generation(results)
    lines += ["## Workflow overhead", ""] + _dag(results)
    lines += ["## Tokenization", ""] + _tokenization(results)
    lines += ["## GPU", ""] + _gpu(results)
    if results.get("peers"):
        lines += render_peers(results["peers"])
    return "\n".join(lines).rstrip() + "\n"


def render_gpu_markdown(results: dict) -> str:
    """bench/results-gpu.md: the GPU section of a `ftflow bench --gpu` run, with the machine it ran on."""
    lines = [
        "# ftflow benchmarks: GPU",
        "",
        f"`{results['command']}` on {_machine_line(results)}; {results['date']}, "
        f"commit {results['provenance']['git_commit'] or 'unknown'}, {results['seconds']:.0f} s (all sections).",
        "",
    ]
    return "\n".join(lines + _gpu(results)).rstrip() + "\n"
