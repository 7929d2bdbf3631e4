"""The peers section of bench/results.md: ftflow, TRL and LLaMA-Factory on the same job."""

from __future__ import annotations

SIDE_NAMES = {
    "ftflow": "ftflow (packed, LM head on labelled positions only)",
    "trl": "TRL SFTTrainer, padding_free=True",
    "llamafactory": "LLaMA-Factory, llamafactory-cli train (padded batches)",
}

# corpus-level task metrics shown in the table (results.json keeps every one, per-field accuracies included)
SHOWN_METRICS = ("exact_match", "json_field_accuracy", "invalid_json_rate")


def _f(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def _labels(info: dict | None) -> str:
    if not info:
        return "–"
    return f"{info['identical_labels']}/{info['examples']}"


def render_peers(peers: dict) -> list[str]:
    lines = [
        "## Peers: ftflow, TRL and LLaMA-Factory on the same job",
        "",
        f"`{peers.get('command') or 'ftflow bench'}`: {peers['steps']} optimizer steps of {peers['examples_per_step']} "
        f"examples, {peers['rounds']} run(s) per side and method, each in a fresh process, the sides rotating which "
        f"goes first; medians (each run listed). Load average at start {peers.get('load_average_start')}, at end "
        f"{peers.get('load_average_end')}; {peers['seconds']:.0f} s.",
        "",
        "Every side: the same model folder, the same rows in the same order, the same LoRA settings, optimizer, "
        "schedule, batch, steps and seed, fp32 on the CPU. Useful tokens are the assistant tokens of the timed "
        "steps' examples (all steps but the first), the same numerator for every side. Eval loss (validation rows) "
        "and the task metrics (test rows) are computed by ftflow's evaluator on each side's merged model. "
        "**labels**: examples whose token ids and labelled positions equal ftflow's.",
        "",
        "| method | side | useful tokens/s | runs | peak RSS MB | final train loss | eval loss | metrics | labels |",
        "|---|---|--:|---|--:|--:|--:|---|---|",
    ]
    for method, sides in peers["sides"].items():
        for side, s in sides.items():
            numbers = {k: v for k, v in (s.get("metrics") or {}).items() if k in SHOWN_METRICS}
            metrics = ", ".join(f"{k} {_f(v, 3)}" for k, v in numbers.items()) or "–"
            runs = ", ".join(_f(x, 1) for x in s["useful_tokens_per_second_runs"])
            lines.append(
                f"| {method} | {SIDE_NAMES.get(side, side)} | {_f(s['useful_tokens_per_second'], 1)} | {runs} | "
                f"{_f(s['peak_rss_mb'], 0)} | {_f(s['final_train_loss'], 6)} | {_f(s['eval_loss'], 6)} | {metrics} | "
                f"{_labels(s.get('labels'))} |"
            )
    lines += [
        "",
        "| peer | method | speedup (ftflow useful tokens/s / peer's) | memory ratio (ftflow peak RSS / peer's) "
        "| loss gap (final train loss, ftflow - peer) | eval loss gap |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for peer in ("trl", "llamafactory"):
        for method, r in (peers.get(peer) or {}).items():
            lines.append(
                f"| {peer} | {method} | {_f(r['speedup'])}x | {_f(r['memory_ratio'])} | {_f(r['loss_gap'], 6)} | "
                f"{_f(r['eval_loss_gap'], 6)} |"
            )
    lines.append("")
    for side, versions in (peers.get("versions") or {}).items():
        lines.append(f"- {side} versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    for side, why in (peers.get("skipped") or {}).items():
        lines.append(f"- {side} not run: {why}")
    for method, sides in peers["sides"].items():
        for side, s in sides.items():
            for diff in (s.get("labels") or {}).get("differences", []):
                lines.append(
                    f"- {method} {side}, example {diff['example']}: ids equal {diff['ids_equal']}, lengths "
                    f"{diff['lengths']}, labelled only by ftflow {diff['only_ftflow']}, only by the peer {diff['only_peer']}"
                )
    lines.append("")
    lines.append("Loss at every step (first run of each side):")
    lines.append("")
    for method, sides in peers["sides"].items():
        for side, s in sides.items():
            lines.append(f"- {method} {side}: " + " ".join(f"{x:.4f}" for x in s["losses"]))
    return lines + [""]


def render_peers_only(results: dict) -> str:
    """results.md when only the peer comparison has run (`ftflow bench --only peers` on a fresh folder)."""
    m = results["machine"]
    head = ["# ftflow benchmarks", "", f"Machine: {m.get('cpu')}, {m.get('cpu_count')} cores.", ""]
    return "\n".join(head + render_peers(results["peers"])).rstrip() + "\n"
