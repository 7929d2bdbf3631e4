"""The planner: a raw config in, a `Plan` out (everything the Snakefile needs, computed once).

`build_plan` validates the raw config against the schema, expands sweeps,
resolves every stage (defaults <- experiment <- stage) into the typed specs of
ftflow.specs, hands out one data_id per distinct tokenization, and adds the
untuned baselines. Nothing here imports torch or transformers, so planning a
500-experiment DAG stays fast.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ..atomic import write_if_changed
from ..errors import ConfigError
from ..hashing import content_hash
from ..paths import Layout
from ..specs import (
    FORMAT_VERSION,
    DatasetSpec,
    DataSpec,
    EvalSpec,
    ExperimentSpec,
    HarnessSpec,
    ModelSpec,
    StageSpec,
)
from .checks import check_choice, check_keys, check_name
from .datasets import FileHashCache, resolve_dataset, source_fingerprint, template_text, tokenization_settings
from .harness import drop_stale_harness_configs, harness_settings, resolve_harness, resolve_harness_jobs
from .loading import deep_merge, normalize_raw
from .schema import (
    DEFAULT_KEYS,
    EVAL_DEFAULTS,
    EXPERIMENT_KEYS,
    METRIC_OUTPUTS,
    METRICS,
    MODEL_DEFAULTS,
    REPORT_DEFAULTS,
    SMOKE_DEFAULTS,
    STAGE_KEYS,
    check_against_schema,
    primary_metric_choices,
)
from .searches import SearchSpec, SearchTrials, check_searches, trial_name_pattern
from .sections import check_positive_ints, check_section
from .stages import check_adalora_schedule, check_adapter_continuation, merge_layers, raw_stages, resolve_stage
from .sweeps import expand_sweeps


@dataclass
class Plan:
    """The resolved config: every model, dataset, experiment and tokenization job of a run."""

    models: dict[str, ModelSpec]
    datasets: dict[str, DatasetSpec]
    experiments: dict[str, ExperimentSpec]
    data: dict[str, DataSpec]
    smoke: bool
    layout: Layout
    report: dict = field(default_factory=dict)  # the report section, schema defaults filled in
    searches: dict[str, SearchSpec] = field(default_factory=dict)
    trials: SearchTrials | None = field(default=None, repr=False)  # the searches' trials, as planned so far
    harness: dict[str, HarnessSpec] = field(default_factory=dict)  # eval.harness per experiment with tasks

    def model_dir_name(self, model: str) -> str:
        return Layout.model_name(model, self.smoke)

    def add_round_trials(self, trials_file: str) -> list[str]:
        """The experiments that run a planned search round's trials (see config.searches)."""
        with open(trials_file, encoding="utf-8") as handle:
            return self.trials.add(json.load(handle))

    def trial_name_pattern(self) -> str:
        """`|` and a regular expression of the searches' trial names, or '' (for wildcard constraints)."""
        return "|" + trial_name_pattern(self.searches) if self.searches else ""

    def trial_data_pattern(self) -> str:
        """`|` and a regular expression of the data_ids a trial can add (a max_length never planned), or ''."""
        if not self.searches:
            return ""
        return "|" + "|".join(f"{re.escape(name)}-[0-9a-f]{{12}}" for name in self.datasets)

    def write_experiment_specs(self, experiments: list[ExperimentSpec]) -> list[str]:
        """config.json of these experiments, the spec of each tokenization they use and their
        harness-config.json (eval.harness), where changed."""
        specs: list[tuple[str, Any]] = [(self.layout.experiment_config(exp.name), exp.to_json()) for exp in experiments]
        data_ids = {d for exp in experiments for s in exp.stages for d in s.data_ids} | {
            e.eval.data_id for e in experiments
        }
        specs.extend(self._data_spec(data_id) for data_id in sorted(data_ids))
        specs += [
            (self.layout.harness_config(e.name), self.harness[e.name].to_json())
            for e in experiments
            if e.name in self.harness
        ]
        return [path for path, spec in specs if write_if_changed(path, spec)]

    def _data_spec(self, data_id: str) -> tuple[str, dict]:
        data = self.data[data_id]
        # Only what changes the tokens: editing a dataset's metrics rewrites no spec, re-runs no tokenize job.
        spec = {**data.settings, "data_id": data_id, "dataset": data.dataset.name, "model": data.model}
        spec["model_dir"] = self.layout.model_dir(self.model_dir_name(data.model))
        return self.layout.data_spec(data_id), spec

    def write_specs(self) -> list[str]:
        """Write config.json per experiment and spec files per model and data job.

        A file is rewritten only when its content changes, so its mtime tells
        Snakemake exactly which jobs are out of date (the report's list of
        experiments too). Returns the paths written.
        """
        specs: list[tuple[str, Any]] = [
            (self.layout.experiment_config(exp.name), exp.to_json()) for exp in self.experiments.values()
        ]
        for name, model in self.models.items():
            spec = {"model": asdict(model), "smoke": self.smoke, "format_version": FORMAT_VERSION}
            specs.append((self.layout.model_spec(self.model_dir_name(name)), spec))
        specs.extend(self._data_spec(data_id) for data_id in self.data)
        for search in self.searches.values():
            specs.extend(
                (self.layout.search_round_spec(search.name, k), search.round_spec(k)) for k in range(len(search.rounds))
            )
        # Apart from config.json: editing eval.harness re-runs only the harness jobs (and the report).
        specs += [(self.layout.harness_config(name), spec.to_json()) for name, spec in self.harness.items()]
        drop_stale_harness_configs(self.layout, self.experiments, self.harness)
        # The experiments the report covers: a new or removed experiment re-runs the report.
        # (A search's trials come and go with its rounds; the report finds them through results/search/.)
        trials = self.trials.experiment_of if self.trials else {}
        specs.append((self.layout.experiments_file(), sorted(e for e in self.experiments if e not in trials)))
        return [path for path, spec in specs if write_if_changed(path, spec)]

    def summary(self) -> list[dict]:
        """One row per experiment for `ftflow resolve`."""
        return [
            {
                "experiment": exp.name,
                "model": exp.model,
                "baseline": exp.baseline,
                "sweep": exp.sweep,
                "stages": [
                    {
                        "name": s.name,
                        "method": s.method,
                        "datasets": list(s.datasets),
                        "data_ids": list(s.data_ids),
                        "mix": s.mix,
                        "data": s.data_text,
                    }
                    for s in exp.stages
                ],
                "eval_data_id": exp.eval.data_id,
                "config_hash": exp.config_hash,
            }
            for exp in self.experiments.values()
        ]


class DataJobs:
    """The plan's tokenization jobs, one per distinct set of token-changing settings.

    Stages and evaluations ask for the data_id of (dataset, model, max_length);
    asking twice for the same tokens gives the same id, so experiments share
    tokenized data.
    """

    def __init__(self, models: dict[str, ModelSpec], workdir: str, smoke: dict | None, hashes: FileHashCache):
        self.models = models
        self.workdir = workdir
        self.hashes = hashes
        self.jobs: dict[str, DataSpec] = {}
        self._dataset_settings: dict[str, dict] = {}
        self._chat_templates: dict[str, str | None] = {}
        self.smoke = smoke is not None
        self.row_caps = (
            {"train": smoke["train_rows"], "validation": smoke["eval_rows"], "test": smoke["eval_rows"]}
            if smoke
            else None
        )
        self.plans_jobs = True  # False in a probe(): ids handed out, no job planned

    def probe(self) -> DataJobs:
        """The same data_ids (and caches), planning no tokenization job: what a search's probes resolve
        with, since a probe is a check, not an experiment that runs."""
        view = copy.copy(self)
        view.plans_jobs = False
        return view

    def dataset_settings(self, dataset: DatasetSpec) -> dict:
        """What of the dataset changes its tokens, with its source's content hash: computed once
        per dataset (it globs and may hash large files), however many stages ask."""
        if dataset.name not in self._dataset_settings:
            self._dataset_settings[dataset.name] = {
                **tokenization_settings(dataset, self.workdir),
                "fingerprint": source_fingerprint(dataset, self.workdir, self.hashes),
            }
        return self._dataset_settings[dataset.name]

    def model_chat_template(self, model: str) -> str | None:
        """A model's chat template text, read once per model (and only for chat data)."""
        if model not in self._chat_templates:
            spec = self.models[model]
            self._chat_templates[model] = template_text(
                spec.chat_template, self.workdir, f"models.{model}.chat_template"
            )
        return self._chat_templates[model]

    def data_id(self, dataset: DatasetSpec, model: str, max_length: int) -> str:
        tokenizer_source = "smoke-tokenizer" if self.smoke else self.models[model].source_text()
        settings = {
            **self.dataset_settings(dataset),
            "max_length": max_length,
            "row_caps": self.row_caps,
            "tokenizer": tokenizer_source,
            # only chat rows are rendered with the model's chat template
            "model_chat_template": self.model_chat_template(model) if dataset.kind == "chat" else None,
        }
        # The name prefix keeps results/data/ readable; the hash covers exactly the settings.
        data_id = f"{dataset.name}-{content_hash(settings, 12)}"
        if self.plans_jobs and data_id not in self.jobs:
            self.jobs[data_id] = DataSpec(
                data_id=data_id,
                dataset=dataset,
                model=model,
                tokenizer_source=tokenizer_source,
                max_length=max_length,
                row_caps=self.row_caps,
                fingerprint=settings["fingerprint"],
                settings=settings,
            )
        return data_id


def build_plan(raw: dict, workdir: str = ".", results: str = "results", check_schema: bool = True) -> Plan:
    """Validate and resolve a raw config into a Plan. Raises ConfigError on the first problem.

    `check_schema=False` skips the JSON Schema (tests of the checks behind it).
    """
    raw = normalize_raw(raw)
    if check_schema:
        check_against_schema(raw)
    smoke_on = bool(raw.get("smoke", False))
    smoke = deep_merge(SMOKE_DEFAULTS, raw.get("smoke_options") or {}) if smoke_on else None
    models = {name: resolve_model(name, spec or {}) for name, spec in (raw.get("models") or {}).items()}
    datasets = {name: resolve_dataset(name, spec or {}, workdir) for name, spec in (raw.get("datasets") or {}).items()}
    defaults = raw.get("defaults") or {}
    check_keys("defaults", defaults, DEFAULT_KEYS)
    layout = Layout(results)
    hashes = FileHashCache(layout.file_hashes())
    data = DataJobs(models, workdir, smoke, hashes)
    experiments: dict[str, ExperimentSpec] = {}
    harness: dict[str, tuple[str, dict]] = {}
    for name, exp in expand_sweeps(raw).items():
        path = f"experiments.{name}" if "_sweep" not in exp else f"sweeps.{exp['_sweep']['name']} (experiment {name})"
        experiments[name] = resolve_experiment(name, exp, defaults, models, datasets, data, smoke)
        harness[name] = (path, harness_settings(path, defaults, exp))
    if not experiments:
        raise ConfigError("experiments", "no experiments defined")
    report = deep_merge(REPORT_DEFAULTS, raw.get("report") or {})

    def resolve_trial(name: str, exp: dict) -> ExperimentSpec:
        return resolve_experiment(name, exp, defaults, models, datasets, data, smoke)

    probe_data = data.probe()

    def resolve_probe(name: str, exp: dict) -> ExperimentSpec:
        return resolve_experiment(name, exp, defaults, models, datasets, probe_data, smoke)

    searches = check_searches(raw, experiments, resolve_probe)
    if report["baseline"]:
        add_baselines(experiments)
    harness_jobs = resolve_harness_jobs(experiments, harness, workdir, smoke)
    hashes.save()
    plan = Plan(
        models=models,
        datasets=datasets,
        experiments=experiments,
        data=data.jobs,
        smoke=smoke_on,
        layout=layout,
        report=report,
        searches=searches,
        harness=harness_jobs,
    )

    def resolve_trial_harness(name: str, exp: dict, spec: ExperimentSpec) -> HarnessSpec | None:
        path = f"searches.{spec.sweep} (trial {name})"
        return resolve_harness(path, spec, harness_settings(path, defaults, exp), workdir, smoke)

    if searches:
        plan.trials = SearchTrials(plan, resolve_trial, resolve_trial_harness)
        plan.trials.add_rounds_on_disk()
    return plan


def resolve_model(name: str, raw: Any) -> ModelSpec:
    path = f"models.{name}"
    check_name(path, name, "model")
    check_keys(path, raw, ModelSpec.__dataclass_fields__.keys() - {"name"})
    sources = [k for k in ("hub", "path", "package") if raw.get(k)]
    if len(sources) != 1:
        raise ConfigError(path, "set exactly one of 'hub', 'path' or 'package'", f"found {sources or 'none'}")
    if raw.get("package") and not raw.get("file"):
        raise ConfigError(f"{path}.file", "a model from a package needs the GGUF file name")
    return ModelSpec(name=name, **{**MODEL_DEFAULTS, **raw})


def resolve_experiment(
    name: str,
    exp: dict,
    defaults: dict,
    models: dict[str, ModelSpec],
    datasets: dict[str, DatasetSpec],
    data: DataJobs,
    smoke: dict | None,
) -> ExperimentSpec:
    sweep = exp.pop("_sweep", None)
    path = f"sweeps.{sweep['name']} (experiment {name})" if sweep else f"experiments.{name}"
    check_keys(path, exp, EXPERIMENT_KEYS)
    model = exp.get("model", defaults.get("model"))
    if model is None:
        raise ConfigError(f"{path}.model", "no model set", "set 'model' here or in defaults")
    if model not in models:
        raise ConfigError(f"{path}.model", f"unknown model {model!r}", f"defined: {', '.join(models) or 'none'}")
    baseline = bool(exp.get("baseline", False))
    if baseline and "stages" in exp:
        raise ConfigError(f"{path}.stages", "a baseline experiment evaluates the untuned model and has no stages")
    stages: list[StageSpec] = []
    if not baseline:
        shared = {k: v for k, v in exp.items() if k in STAGE_KEYS}
        stage_defaults = {k: v for k, v in defaults.items() if k in STAGE_KEYS}
        for index, (stage_path, stage_raw) in enumerate(raw_stages(f"experiments.{name}", exp)):
            check_keys(stage_path, stage_raw, STAGE_KEYS)
            default_name = f"stage{index + 1}" if "stages" in exp else "train"
            stage = resolve_stage(
                stage_path,
                index,
                merge_layers(stage_defaults, shared, stage_raw),
                default_name,
                datasets,
                smoke,
                lambda dataset, max_length: data.data_id(dataset, model, max_length),
            )
            if any(s.name == stage.name for s in stages):
                raise ConfigError(f"{stage_path}.name", f"duplicate stage name {stage.name!r}")
            if stage.init_from == "adapter":
                check_adapter_continuation(stage_path, stage, stages[-1])
            if stage.method == "adalora":
                check_adalora_schedule(stage_path, stage, datasets, data.workdir)
            stages.append(stage)
    # A mixture is evaluated on its last member, the task data; a baseline on the default dataset.
    fallback = stages[-1].datasets[-1] if stages else _last_member(defaults.get("dataset"))
    eval_raw = deep_merge(defaults.get("eval") or {}, exp.get("eval") or {})
    return ExperimentSpec(
        name=name,
        model=model,
        stages=tuple(stages),
        eval=resolve_eval(f"{path}.eval", eval_raw, fallback, model, datasets, data, smoke),
        baseline=baseline,
        description=str(exp.get("description", "")),
        sweep=sweep["name"] if sweep else None,
        sweep_params=sweep["params"] if sweep else {},
        smoke=smoke is not None,
    )


def _last_member(dataset: str | list | None) -> str | None:
    return dataset[-1] if isinstance(dataset, list) and dataset else dataset


def resolve_eval(
    path: str,
    eval_raw: dict,
    fallback_dataset: str | None,
    model: str,
    datasets: dict[str, DatasetSpec],
    data: DataJobs,
    smoke: dict | None,
) -> EvalSpec:
    """The evaluation of an experiment's final model; `fallback_dataset` is used when eval names none."""
    values = deep_merge(EVAL_DEFAULTS, check_section(path, "eval", eval_raw))
    dataset_name = values["dataset"] or fallback_dataset
    if dataset_name is None:
        raise ConfigError(f"{path}.dataset", "no dataset to evaluate on", "set eval.dataset")
    if dataset_name not in datasets:
        raise ConfigError(f"{path}.dataset", f"unknown dataset {dataset_name!r}")
    dataset = datasets[dataset_name]
    metrics = tuple(values["metrics"] if values["metrics"] is not None else dataset.metrics)
    for metric in metrics:  # a sweep may set eval.metrics, which the schema never sees
        check_choice(f"{path}.metrics", metric, METRICS, "metric")
    if metrics and dataset.kind == "text":
        raise ConfigError(
            f"{path}.metrics",
            f"dataset {dataset_name!r} is raw text: it has no prompts to generate answers from",
            "score it by eval_loss/perplexity (metrics: []), or evaluate on a chat or instruction dataset",
        )
    primary = (
        values["primary_metric"]
        or dataset.primary_metric
        or (METRIC_OUTPUTS[metrics[0]][0] if metrics else "eval_loss")
    )
    if primary not in primary_metric_choices(metrics):
        raise ConfigError(
            f"{path}.primary_metric",
            f"{primary!r} is not a number the evaluation reports",
            f"one of {', '.join(primary_metric_choices(metrics))}",
        )
    check_positive_ints(path, values, ("max_new_tokens", "batch_size"))
    # Every experiment is scored on the same tokens: the dataset's own max_length,
    # whatever a stage trained with, so rows of a sweep over max_length stay comparable.
    max_length = min(dataset.max_length, smoke["max_length"]) if smoke else dataset.max_length
    return EvalSpec(
        dataset=dataset_name,
        data_id=data.data_id(dataset, model, max_length),
        split=values["split"],
        loss_split=values["loss_split"],
        max_new_tokens=min(values["max_new_tokens"], smoke["max_new_tokens"]) if smoke else values["max_new_tokens"],
        batch_size=values["batch_size"],
        do_sample=bool(values["do_sample"]),
        temperature=float(values["temperature"]),
        top_p=float(values["top_p"]),
        max_examples=values["max_examples"],
        metrics=metrics,
        primary_metric=primary,
    )


def add_baselines(experiments: dict[str, ExperimentSpec]) -> None:
    """Add one untuned-model experiment per (model, eval data) that no configured baseline covers."""
    have = {(e.model, e.eval.data_id) for e in experiments.values() if e.baseline}
    wanted: dict[tuple[str, str], ExperimentSpec] = {}
    for exp in experiments.values():
        key = (exp.model, exp.eval.data_id)
        if not exp.baseline and key not in have and key not in wanted:
            wanted[key] = exp
    for (model, _), exp in wanted.items():
        name = "baseline" if len(wanted) == 1 else f"baseline-{model}-{exp.eval.dataset}"
        if name in experiments:
            raise ConfigError(
                f"experiments.{name}",
                "this name is reserved for the automatic baseline",
                "rename the experiment or set report.baseline: false",
            )
        experiments[name] = ExperimentSpec(
            name=name,
            model=model,
            stages=(),
            eval=exp.eval,
            baseline=True,
            description="untuned base model",
            smoke=exp.smoke,
        )
