"""The search jobs: plan a round's trials (Optuna ask), record their results (tell), pick the best.

Each job rebuilds the search's Optuna study from the round files that came
before it, in memory, with a sampler seeded by the search's seed and the round
number. The same config and the same earlier results therefore give the same
trials, whatever ran or was killed before: a killed planning job leaves no
half-told study behind, and re-running it asks the same questions again.
`results/search/{search}/study.db` is that study written to Optuna's SQLite
storage (for optuna-dashboard and the like) when the search finishes.

Files (paths from ftflow.paths.Layout):

  round-{k}.spec.json    from the planner: what round k reads
  round-{k}.trials.json  plan_round: {number, name, settings, budget} per trial
  round-{k}.json         tell_round: the same trials with experiment, state, value, told, train_tokens
  best.json, study.db    finish_search
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from typing import Any

from .atomic import read_json, write_json
from .hashing import content_hash
from .metrics import metric_value
from .paths import Layout
from .specs import ExperimentSpec

log = logging.getLogger(__name__)

STATES = ("complete", "diverged", "failed")
TRIAL_HASH_CHARS = 8  # as the planner's trial name pattern expects


def trial_name(spec: dict, settings: dict, budget: dict) -> str:
    """`{search}-{hash}`: content-addressed by the search's fingerprint, the settings and the budget."""
    key = {"fingerprint": spec["fingerprint"], "settings": settings, "budget": budget}
    return f"{spec['search']}-{content_hash(key, TRIAL_HASH_CHARS)}"


# ------------------------------------------------------------------ the study


def _encode(value: Any) -> Any:
    """A choice as Optuna stores it: scalars as they are, lists and mappings as JSON text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, sort_keys=True)


def distributions(space: list[dict]) -> dict:
    import optuna.distributions as od

    out = {}
    for dim in space:
        if dim["kind"] == "choice":
            out[dim["name"]] = od.CategoricalDistribution([_encode(v) for v in dim["choices"]])
        elif dim["kind"] == "int":
            out[dim["name"]] = od.IntDistribution(dim["low"], dim["high"], log=dim["log"], step=dim["step"] or 1)
        else:
            out[dim["name"]] = od.FloatDistribution(dim["low"], dim["high"], log=dim["log"], step=dim["step"])
    return out


def grid_space(space: list[dict]) -> dict[str, list]:
    """Every value of every dimension, for the grid sampler (the planner made sure each is finite)."""
    grid = {}
    for dim in space:
        if dim["kind"] == "choice":
            grid[dim["name"]] = [_encode(v) for v in dim["choices"]]
        else:
            step = dim["step"] or 1
            count = int(math.floor((dim["high"] - dim["low"]) / step + 1e-9)) + 1
            grid[dim["name"]] = [_clean(dim, dim["low"] + i * step) for i in range(count)]
    return grid


def _clean(dim: dict, value: Any) -> Any:
    """A sampled value as a trial records it: ints as ints, floats to 4 significant digits (or on the
    step's grid), inside the range; a choice decoded back to the configured value."""
    if dim["kind"] == "choice":
        encoded = [_encode(v) for v in dim["choices"]]
        return dim["choices"][encoded.index(value)]
    if dim["kind"] == "int":
        return int(value)
    value = round(value, 10) if dim["step"] else float(f"{value:.4g}")
    return min(max(value, dim["low"]), dim["high"])


def make_sampler(spec: dict, k: int):
    import optuna

    seed = spec["seed"] * 1000 + k  # one stream per round: round 2 does not replay round 0's draws
    if spec["sampler"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec["sampler"] == "grid":
        # One shuffled order of the grid for every round, walked on from where the trials so far stopped:
        # GridSampler gives trial number i < grid size the i-th point of its order, so a per-round shuffle
        # would hand later rounds points already run (grid_point marks those for the rest of the walk).
        return optuna.samplers.GridSampler(grid_space(spec["space"]), seed=spec["seed"] * 1000)
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def told_trials(spec: dict, rounds: list[dict], grid=None) -> list:
    """The finished trials of earlier rounds as Optuna FrozenTrials: a diverged one told as the worst value
    so far (so the sampler learns where the boundary is), a failed one as failed. With a GridSampler
    (`grid`), each is marked as the grid point it ran, so no later round asks for it again."""
    import optuna

    dists = distributions(spec["space"])
    frozen = []
    for doc in rounds:
        for trial in doc["trials"]:
            params = {name: _encode(value) for name, value in trial["settings"].items()}
            told = trial.get("told")
            # A failed trial (its job raised: out of memory, a setting its library refused, a lost node) is
            # told as FAIL, not as the worst value: the failure says nothing about the metric there, and a
            # fake worst value would steer the sampler away from settings that may score well once they run.
            # TPE leaves FAIL trials out of its model; a diverged run is a measured outcome, told the worst.
            state = optuna.trial.TrialState.COMPLETE if told is not None else optuna.trial.TrialState.FAIL
            frozen.append(
                optuna.trial.create_trial(
                    params=params,
                    distributions=dists,
                    value=told,
                    state=state,
                    user_attrs={"experiment": trial["experiment"], "round": doc["round"], "state": trial["state"]},
                    system_attrs=grid_point(grid, params) if grid is not None else None,
                )
            )
    return frozen


def grid_point(grid, params: dict) -> dict:
    """The system attributes by which Optuna's GridSampler knows a finished trial's point as visited: its
    index in that sampler's (seeded, shuffled) grid and the grid's search space. A trial told from a round
    file has neither, and without them every round would draw from the whole grid, earlier points included.
    These are GridSampler's own bookkeeping (private names of the pinned Optuna version; the search tests
    would catch a change)."""
    point = tuple(params[name] for name in grid._param_names)
    if point not in grid._all_grids:
        return {}
    return {"grid_id": grid._all_grids.index(point), "search_space": grid._search_space}


def build_study(spec: dict, rounds: list[dict], k: int, storage: str | None = None):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = make_sampler(spec, k)
    study = optuna.create_study(
        storage=storage, study_name=spec["search"], direction=spec["direction"], sampler=sampler
    )
    grid = sampler if isinstance(sampler, optuna.samplers.GridSampler) else None
    study.add_trials(told_trials(spec, rounds, grid))
    return study


# ------------------------------------------------------------------ plan, tell, best


def plan_round(spec_path: str, previous: list[str], out: str) -> dict:
    """Choose round k's trials: new ones asked of the sampler, or the best so far promoted."""
    spec = read_json(spec_path)
    k = spec["round"]
    rounds = [read_json(path) for path in previous]
    if [doc["round"] for doc in rounds] != list(range(k)):
        raise ValueError(f"round {k} of search {spec['search']!r} needs the results of rounds 0..{k - 1}")
    this = spec["rounds"][k]
    budget = dict(this["training"])
    number = sum(len(doc["trials"]) for doc in rounds)
    trials = []
    if this["kind"] == "promote":
        for trial in best_trials(spec, rounds, this["n"]):
            trials.append({"settings": trial["settings"], "budget": budget, "promoted_from": trial["name"]})
        if len(trials) < this["n"]:  # said out loud: the earlier rounds finished fewer distinct trials
            log.warning(
                "search %s round %d promotes %d of %d: no more distinct trials finished before it",
                spec["search"],
                k,
                len(trials),
                this["n"],
            )
    else:
        study = build_study(spec, rounds, k)
        dims = {dim["name"]: dim for dim in spec["space"]}
        dists = distributions(spec["space"])
        for _ in range(this["n"]):
            asked = study.ask(dists)
            trials.append({"settings": {n: _clean(dims[n], v) for n, v in asked.params.items()}, "budget": budget})
    for i, trial in enumerate(trials):
        trial["number"] = number + i
        trial["name"] = trial_name(spec, trial["settings"], trial["budget"])
    doc = {
        "search": spec["search"],
        "round": k,
        "kind": this["kind"],
        "spec_hash": content_hash(spec),
        "trials": [{key: t[key] for key in sorted(t)} for t in trials],
    }
    write_json(out, doc)
    return doc


def best_trials(spec: dict, rounds: list[dict], n: int) -> list[dict]:
    """The n best finished trials so far, one per distinct settings, best first (ties: earlier first)."""
    sign = 1 if spec["direction"] == "minimize" else -1
    ranked = sorted(
        (t for doc in rounds for t in doc["trials"] if t["state"] == "complete"),
        key=lambda t: (sign * t["value"], t["number"]),
    )
    chosen, seen = [], set()
    for trial in ranked:
        key = json.dumps(trial["settings"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            chosen.append(trial)
    return chosen[:n]


def tell_round(spec_path: str, trials_path: str, experiments: list[str], results: str, previous: list[str], out: str):
    """Record each trial's state and value from its experiment's outputs; `experiments` runs the trials, in order."""
    spec = read_json(spec_path)
    doc = read_json(trials_path)
    if len(experiments) != len(doc["trials"]):
        raise ValueError(f"{len(doc['trials'])} trials but {len(experiments)} experiments")
    layout = Layout(results)
    metric = spec["metric"]
    earlier = [t for path in previous for t in read_json(path)["trials"]]
    ran_before = {t["experiment"] for t in earlier}
    for trial, experiment in zip(doc["trials"], experiments):
        trial["experiment"] = experiment
        # results of an equal experiment (a sweep point, the base) or of an earlier round's trial
        trial["reused"] = experiment != trial["name"] or experiment in ran_before
        trial.update(trial_outcome(layout, experiment, metric))
    # A diverged trial is told the worst value seen so far, this round's included.
    values = [t["value"] for t in earlier + doc["trials"] if t["state"] == "complete"]
    worst = (max(values) if spec["direction"] == "minimize" else min(values)) if values else None
    for trial in doc["trials"]:
        trial["told"] = (
            trial["value"] if trial["state"] == "complete" else worst if trial["state"] == "diverged" else None
        )
    doc.update(metric=metric, direction=spec["direction"])
    write_json(out, doc)
    return doc


def trial_outcome(layout: Layout, experiment: str, metric: str) -> dict:
    """state (complete, diverged, failed), value of the metric and the tokens trained, from the outputs."""
    try:
        metrics = read_json(layout.eval_metrics(experiment))
    except (OSError, ValueError):
        return {"state": "failed", "value": None, "train_tokens": None, "reason": "no eval/metrics.json"}
    tokens = 0
    try:
        spec = ExperimentSpec.read(layout.experiment_config(experiment))
        for stage in spec.stages:
            tokens += int(read_json(layout.train_metrics(experiment, stage.name)).get("tokens") or 0)
    except (OSError, ValueError, KeyError):
        tokens = None
    value = metric_value(metrics, metric)
    status = metrics.get("status", "ok")
    if status == "ok" and isinstance(value, (int, float)) and math.isfinite(value):
        return {"state": "complete", "value": float(value), "train_tokens": tokens}
    reason = metrics.get("reason") or (f"{metric} missing" if status == "ok" else status)
    state = "diverged" if status == "diverged" else "failed"
    return {"state": state, "value": None, "train_tokens": tokens, "reason": reason}


def finish_search(spec_path: str, rounds_paths: list[str], best_out: str, study_out: str) -> dict:
    """best.json (the best trial, the boundary, the settings' importances) and study.db."""
    spec = read_json(spec_path)
    rounds = [read_json(path) for path in rounds_paths]
    trials = [dict(t, round=doc["round"]) for doc in rounds for t in doc["trials"]]
    best = best_trials(spec, rounds, 1)
    os.makedirs(os.path.dirname(study_out) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".study-", suffix=".db", dir=os.path.dirname(study_out) or ".")
    os.close(fd)
    os.unlink(tmp)
    try:
        study = build_study(spec, rounds, len(rounds), storage=f"sqlite:///{tmp}")
        importances = param_importances(study)
        del study
        os.replace(tmp, study_out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    summary = {
        "search": spec["search"],
        "metric": spec["metric"],
        "direction": spec["direction"],
        "trials": len(trials),
        "states": {state: sum(t["state"] == state for t in trials) for state in STATES},
        # each experiment once: a promoted or reused trial trained nothing new
        "train_tokens": sum({t["experiment"]: t.get("train_tokens") or 0 for t in trials}.values()),
        # said out loud: which trials failed and why (the error's line, from the job that raised)
        "failed": [
            {key: t.get(key) for key in ("number", "round", "name", "experiment", "reason")}
            for t in trials
            if t["state"] == "failed"
        ],
        "best": None,
        "boundary": boundaries(spec, trials),
        "importances": importances,
    }
    if best:
        top = dict(best[0])
        summary["best"] = {
            key: top.get(key) for key in ("name", "experiment", "number", "settings", "budget", "value", "round")
        }
        summary["best"]["round"] = next(t["round"] for t in trials if t["name"] == top["name"])
    write_json(best_out, summary)
    return summary


def param_importances(study) -> dict[str, float] | None:
    """Optuna's PED-ANOVA importances of the settings (numpy only; fANOVA would need scikit-learn),
    or None with too few finished trials to say."""
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 3 or len({json.dumps(t.params, sort_keys=True) for t in complete}) < 2:
        return None
    try:
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
        return {k: round(float(v), 4) for k, v in importances.items()}
    except (ValueError, RuntimeError, ImportError) as err:  # e.g. a space with a single value left
        log.warning("no importances: %s", err)
        return None


def boundaries(spec: dict, trials: list[dict]) -> list[dict]:
    """Per numeric setting where runs diverged: from the lowest diverged value up, how many diverged.

    A setting where every trial at or above that value diverged is a boundary the search found;
    the list is sorted by that share, the clearest first.
    """
    out = []
    # each experiment once: a trial asked again (or promoted at the same budget) is the same run
    ran = list({t["experiment"]: t for t in trials if t["state"] in ("complete", "diverged")}.values())
    for dim in spec["space"]:
        if dim["kind"] == "choice" and not all(_is_number(v) for v in dim["choices"]):
            continue  # only ordered settings have a boundary: ranges and lists of numbers
        name = dim["name"]
        diverged = [t["settings"][name] for t in ran if t["state"] == "diverged" and name in t["settings"]]
        if not diverged:
            continue
        threshold = min(diverged)
        above = [t for t in ran if t["settings"].get(name, -math.inf) >= threshold]
        count = sum(t["state"] == "diverged" for t in above)
        out.append({"setting": name, "at_or_above": threshold, "diverged": count, "of": len(above)})
    return sorted(out, key=lambda b: (-b["diverged"] / b["of"], -b["of"]))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
