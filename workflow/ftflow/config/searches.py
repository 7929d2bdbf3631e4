"""Searches: a base experiment explored in rounds over a space of dotted-key settings.

The planner checks a search completely before any job (every space key
against what the base experiment can take, every range, every round and the
metric) and writes one spec file per round, `results/search/{search}/round-{k}.spec.json`,
holding exactly what planning that round reads: editing a later round leaves
the earlier rounds' specs, and so their trials, untouched.

The trials themselves are chosen by a job (ftflow.search, Optuna ask/tell)
that writes `round-{k}.trials.json`; the planner turns each listed trial back
into an experiment (the base with the trial's settings and budget), so trials
train, merge and evaluate through the same rules and config.json as any other
experiment. A trial whose resolved config equals an experiment already planned
(a sweep point, an earlier trial) is mapped onto it and reuses its results.

Standard library only, like the rest of the planner: Optuna is the job's.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

from ..atomic import read_json
from ..errors import ConfigError
from ..hashing import content_hash
from ..specs import ExperimentSpec, HarnessSpec
from .checks import check_name, did_you_mean
from .schema import primary_metric_choices
from .sweeps import _check_override_key, _set_dotted

# Round spec and trial file format; bump when the files' meaning changes.
SEARCH_FORMAT = 1
# Numbers where lower is better; every other metric output is maximized.
MINIMIZED = ("eval_loss", "perplexity", "invalid_json", "invalid_json_rate")
TRIAL_HASH_CHARS = 8  # trial names are `{search}-{8 hex digits}`
# What of a resolved experiment is its identity, not its name or where it came from.
_NOT_IDENTITY = ("name", "description", "sweep", "sweep_params")

Resolver = Callable[[str, dict], ExperimentSpec]
# (trial name, its raw experiment, its spec) -> its eval.harness benchmarks, or None without tasks
HarnessResolver = Callable[[str, dict, ExperimentSpec], HarnessSpec | None]


@dataclass(frozen=True)
class SearchSpec:
    """One search, checked: its space as typed dimensions and its rounds normalized."""

    name: str
    base: str
    metric: str
    direction: str  # minimize | maximize
    space: tuple[dict, ...]  # {name, keys, kind: float|int|choice, low, high, log, step, choices}
    sampler: str
    seed: int
    rounds: tuple[dict, ...]  # {kind: trials|promote, n, training}
    fingerprint: str  # base config, space and metric: a change makes new trial names
    base_raw: dict

    def round_spec(self, k: int) -> dict:
        """What planning round k reads: the search's identity and rounds 0..k (never a later round)."""
        return {
            "format": SEARCH_FORMAT,
            "search": self.name,
            "round": k,
            "fingerprint": self.fingerprint,
            "metric": self.metric,
            "direction": self.direction,
            "sampler": self.sampler,
            "seed": self.seed,
            "space": list(self.space),
            "rounds": list(self.rounds[: k + 1]),
        }

    def trial_raw(self, trial: dict) -> dict:
        """The raw experiment of one trial: the base, its settings, then its round's training budget."""
        exp = copy.deepcopy(self.base_raw)
        params = settings_by_key(trial["settings"])
        for dotted, value in params.items():
            _set_dotted(exp, dotted, value, f"searches.{self.name}.space.{dotted}")
        for key, value in (trial.get("budget") or {}).items():
            _set_dotted(exp, f"training.{key}", value, f"searches.{self.name}.rounds")
        exp["_sweep"] = {"name": self.name, "params": params}
        return exp


def settings_by_key(settings: dict) -> dict:
    """{param: value} -> {dotted key: value}: a tied param 'a.b,c.d' with [1, 2] sets both keys."""
    out = {}
    for param, value in settings.items():
        keys = [k.strip() for k in param.split(",")]
        if len(keys) > 1:
            out.update(zip(keys, value))
        else:
            out[param] = value
    return out


def identity(spec: ExperimentSpec) -> str:
    """The hash of what an experiment computes: two experiments with the same one share results."""
    data = spec.to_json()
    for key in _NOT_IDENTITY:
        data.pop(key, None)
    return content_hash(data)


def check_searches(raw: dict, experiments: dict[str, ExperimentSpec], resolve: Resolver) -> dict[str, SearchSpec]:
    """Every search of the config, checked; `resolve` turns a raw experiment into its spec (or raises)."""
    searches = {}
    for name, search in (raw.get("searches") or {}).items():
        path = f"searches.{name}"
        check_name(path, name, "search")
        if name in experiments:
            raise ConfigError(path, f"a search and an experiment are both named {name!r}", "rename one of them")
        searches[name] = _check_search(name, path, search, raw, experiments, resolve)
    return searches


def _check_search(name, path, search, raw, experiments, resolve) -> SearchSpec:
    base = search["base"]
    declared = raw.get("experiments") or {}
    if base not in declared:
        raise ConfigError(f"{path}.base", f"unknown experiment {base!r}", did_you_mean(base, declared))
    base_spec = experiments[base]
    if base_spec.baseline:
        raise ConfigError(f"{path}.base", f"{base!r} is an untuned baseline: it has no training to tune")
    metric = search.get("metric") or base_spec.eval.primary_metric
    choices = primary_metric_choices(base_spec.eval.metrics)
    if metric not in choices:
        raise ConfigError(
            f"{path}.metric",
            f"{metric!r} is not a number the evaluation of {base!r} reports",
            f"one of {', '.join(choices)}",
        )
    sampler = search.get("sampler", "tpe")
    space = tuple(
        _check_dimension(f"{path}.space.{key}", key, value, sampler) for key, value in search["space"].items()
    )
    rounds = _check_rounds(f"{path}.rounds", search["rounds"])
    base_raw = copy.deepcopy(declared[base] or {})
    spec = SearchSpec(
        name=name,
        base=base,
        metric=metric,
        direction="minimize" if metric in MINIMIZED else "maximize",
        space=space,
        sampler=sampler,
        seed=int(search.get("seed", 0)),
        rounds=rounds,
        fingerprint=content_hash({"base": identity(base_spec), "space": space, "metric": metric}),
        base_raw=base_raw,
    )
    _probe(spec, path, resolve)
    return spec


def _check_dimension(path: str, key: str, value: Any, sampler: str) -> dict:
    keys = [k.strip() for k in str(key).split(",")]
    for dotted in keys:
        _check_override_key(dotted, path)
    if isinstance(value, list):
        if len(keys) > 1 and not all(isinstance(v, list) and len(v) == len(keys) for v in value):
            raise ConfigError(path, f"each choice must be a list of {len(keys)} values, one per tied key")
        return {"name": key, "keys": keys, "kind": "choice", "choices": value}
    if len(keys) > 1:
        raise ConfigError(path, "tied keys take a list of choices, not a range")
    low, high, log, step = value["low"], value["high"], bool(value.get("log", False)), value.get("step")
    integer = all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)) and (
        step is None or isinstance(step, int)
    )
    if low >= high:
        raise ConfigError(path, f"empty range: low {low} is not below high {high}", "give one value as a list: [x]")
    if log and low <= 0:
        raise ConfigError(f"{path}.low", f"a log range needs low > 0, got {low}")
    if log and step is not None:
        raise ConfigError(f"{path}.step", "a log range cannot have a step")
    if step is not None and (step <= 0 or step > high - low):
        raise ConfigError(f"{path}.step", f"step {step} leaves no value between {low} and {high}")
    if step is not None and abs((high - low) / step - round((high - low) / step)) > 1e-6:
        # Optuna would quietly lower `high` to the last multiple of the step
        raise ConfigError(f"{path}.step", f"high - low ({high - low:g}) is not a multiple of step {step}")
    if sampler == "grid" and step is None and not integer:
        raise ConfigError(path, "the grid sampler needs a step for a float range", "add step: or list the values")
    return {
        "name": key,
        "keys": keys,
        "kind": "int" if integer else "float",
        "low": low if integer else float(low),
        "high": high if integer else float(high),
        "log": log,
        "step": step,
    }


def _check_rounds(path: str, rounds: list) -> tuple[dict, ...]:
    out = []
    so_far = 0
    for i, item in enumerate(rounds):
        where = f"{path}[{i}]"
        if ("trials" in item) == ("promote" in item):
            raise ConfigError(where, "a round needs exactly one of 'trials: n' or 'promote: n'")
        training = item.get("training") or {}
        for key in training:
            _check_override_key(f"training.{key}", f"{where}.training.{key}")
        if "promote" in item:
            n = item["promote"]
            if n > so_far:
                raise ConfigError(
                    f"{where}.promote", f"promotes {n} trials but the rounds before it run {so_far}", "lower it"
                )
            out.append({"kind": "promote", "n": n, "training": training})
        else:
            n = item["trials"]
            out.append({"kind": "trials", "n": n, "training": training})
        so_far += n
    return tuple(out)


def _probe(spec: SearchSpec, path: str, resolve: Resolver) -> None:
    """Resolve the base with each end of every range, each choice and each round's budget: a setting the
    base cannot take is a config error now, not a failed job later."""
    probes: list[tuple[str, dict, dict]] = []
    for dim in spec.space:
        values = dim["choices"] if dim["kind"] == "choice" else [dim["low"], dim["high"]]
        probes.extend((f"{path}.space.{dim['name']}", {dim["name"]: v}, {}) for v in values)
    for i, item in enumerate(spec.rounds):
        if item["training"]:
            probes.append((f"{path}.rounds[{i}].training", {}, item["training"]))
    for where, settings, budget in probes:
        try:
            resolve(f"{spec.name}-probe", spec.trial_raw({"settings": settings, "budget": budget}))
        except ConfigError as err:
            raise ConfigError(where, f"the base experiment {spec.base!r} cannot take it: {err}") from None


# ------------------------------------------------------------------ trials into the plan


class SearchTrials:
    """The trials of a plan's searches, resolved into experiments as the round files list them.

    Parse time adds the rounds already on disk; during a run, a round's input
    function adds the round its checkpoint just planned. Either way a trial's
    config.json (and the spec of any new tokenization it needs) is written
    only when its content changes.
    """

    def __init__(self, plan, resolve: Resolver, resolve_harness: HarnessResolver | None = None):
        self.plan = plan
        self.resolve = resolve
        self.resolve_harness = resolve_harness
        self.experiment_of: dict[str, str] = {}  # trial name -> the experiment that runs it
        self._by_identity: dict[str, str] | None = None

    def _identities(self) -> dict[str, str]:
        if self._by_identity is None:
            self._by_identity = {}
            for name, exp in self.plan.experiments.items():
                if not exp.baseline:
                    self._by_identity.setdefault(identity(exp), name)
        return self._by_identity

    def add(self, trials_doc: dict, write: bool = True) -> list[str]:
        """The experiment of each trial of a round, in order; new ones are resolved and (with `write`)
        their specs written. Parse time leaves the writing to Plan.write_specs."""
        search = self.plan.searches[trials_doc["search"]]
        names, new = [], []
        for trial in trials_doc["trials"]:
            name = trial["name"]
            if name not in self.experiment_of:
                raw = search.trial_raw(trial)
                try:
                    exp = self.resolve(name, raw)
                except ConfigError as err:
                    raise ConfigError(f"searches.{search.name} (trial {name})", str(err)) from None
                known = self._identities().setdefault(identity(exp), name)
                if known == name:
                    self.plan.experiments[name] = exp
                    # the base's eval.harness benchmarks, run on the trial's model like any experiment's
                    harness = self.resolve_harness(name, raw, exp) if self.resolve_harness else None
                    if harness is not None:
                        self.plan.harness[name] = harness
                    new.append(exp)
                self.experiment_of[name] = known
            names.append(self.experiment_of[name])
        if write and new:
            self.plan.write_experiment_specs(new)
        return names

    def add_rounds_on_disk(self) -> None:
        """Parse time: the trials of every round whose planned file matches its current spec."""
        for search in self.plan.searches.values():
            for k in range(len(search.rounds)):
                doc = read_round_trials(self.plan.layout.search_round_trials(search.name, k))
                if doc is None or doc.get("spec_hash") != content_hash(search.round_spec(k)):
                    break  # later rounds were planned from this one: stale too
                self.add(doc, write=False)


def read_round_trials(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def trial_name_pattern(searches) -> str:
    """A regular expression for every trial name the searches can produce (for wildcard constraints)."""
    return "|".join(f"{re.escape(name)}-[0-9a-f]{{{TRIAL_HASH_CHARS}}}" for name in searches)
