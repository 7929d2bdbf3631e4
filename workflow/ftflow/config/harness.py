"""The eval.harness block: which lm-evaluation-harness benchmarks each experiment runs.

Resolved apart from the experiment's config.json (into a HarnessSpec written to
harness-config.json), so editing it re-runs the harness jobs and the report,
never training or the task eval. A local task YAML, the data files its
`dataset_kwargs.data_files` names, the YAML it `include:`s and the Python files
its `!function` tags point to are hashed into the spec: editing any of them
re-runs the job. Harness task names are not checked here (the harness's task
index takes seconds to build); the job names an unknown or unreachable one.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
from typing import Any

import yaml

from ..errors import ConfigError
from ..paths import Layout
from ..specs import ExperimentSpec, HarnessSpec
from .checks import check_keys
from .loading import deep_merge
from .schema import SCHEMA

_HARNESS = SCHEMA["$defs"]["eval"]["properties"]["harness"]["properties"]
HARNESS_DEFAULTS = {key: prop["default"] for key, prop in _HARNESS.items()}


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads a harness task YAML: its `!function module.name` tags come back as ("!function", "module.name")."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, tag, node: (f"!{tag}", loader.construct_scalar(node)))


def harness_settings(path: str, defaults: dict, raw_exp: dict) -> dict:
    """The experiment's eval.harness, defaults <- experiment, with the schema's defaults filled in."""
    layers = [((d.get("eval") or {}).get("harness") or {}) for d in (defaults, raw_exp)]
    for where, layer in zip(("defaults.eval.harness", f"{path}.eval.harness"), layers):
        check_keys(where, layer, HARNESS_DEFAULTS)
    return deep_merge(deep_merge(HARNESS_DEFAULTS, layers[0]), layers[1])


def resolve_harness_jobs(
    experiments: dict[str, ExperimentSpec], settings: dict[str, tuple[str, dict]], workdir: str, smoke
) -> dict[str, HarnessSpec]:
    """Every experiment's HarnessSpec (those with tasks). `settings` maps each configured experiment to
    (its config path, its eval.harness); an added baseline runs the benchmarks of the tuned runs it
    stands for (same model and eval data; else same model), so each has its untuned counterpart."""
    jobs: dict[str, HarnessSpec] = {}
    for name, exp in experiments.items():
        path, values = settings.get(name) or baseline_settings(exp, experiments, settings)
        spec = resolve_harness(path, exp, values, workdir, smoke)
        if spec is not None:
            jobs[name] = spec
    return jobs


def baseline_settings(
    baseline: ExperimentSpec, experiments: dict[str, ExperimentSpec], settings: dict[str, tuple[str, dict]]
) -> tuple[str, dict]:
    """The eval.harness of the first tuned experiment with tasks that an added baseline compares with."""
    tuned = [
        exp
        for exp in experiments.values()
        if not exp.baseline and exp.model == baseline.model and exp.name in settings and settings[exp.name][1]["tasks"]
    ]
    tuned.sort(key=lambda exp: exp.eval.data_id != baseline.eval.data_id)  # stable: config order within each
    return settings[tuned[0].name] if tuned else (f"experiments.{baseline.name}", HARNESS_DEFAULTS)


def drop_stale_harness_configs(layout: Layout, experiments, harness: dict[str, HarnessSpec]) -> None:
    """Remove harness-config.json of experiments that no longer name tasks, so the report stops showing
    their old benchmarks (eval/harness.json is kept, as every earlier output is)."""
    for name in experiments:
        if name not in harness:
            with contextlib.suppress(FileNotFoundError):
                os.remove(layout.harness_config(name))


def resolve_harness(
    path: str, exp: ExperimentSpec, values: dict, workdir: str, smoke: dict | None
) -> HarnessSpec | None:
    """The experiment's HarnessSpec, or None when it names no tasks."""
    where = f"{path}.eval.harness"
    tasks = values["tasks"]
    if not isinstance(tasks, list) or not all(isinstance(t, str) and t for t in tasks):
        raise ConfigError(f"{where}.tasks", f"expected a list of task names or task YAML files, got {tasks!r}")
    if not tasks:
        return None
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"{where}.tasks", "a task is listed twice")
    for key, low in (("num_fewshot", 0), ("limit", 1), ("batch_size", 1)):
        value = values[key]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise ConfigError(f"{where}.{key}", f"must be an integer >= {low}, got {value!r}")
    if values["batch_size"] is None:
        raise ConfigError(f"{where}.batch_size", "must be an integer >= 1, got None")
    files: dict[str, str] = {}
    for task in tasks:
        if HarnessSpec.is_local_task(task):
            for file in task_files(f"{where}.tasks", task, workdir):
                files[file] = file_sha256(os.path.join(workdir, file))
    limit = values["limit"]
    if smoke:
        limit = min(limit or smoke["eval_rows"], smoke["eval_rows"])
    # every_stage: the merged model after each earlier stage; the last one is the final model itself
    stages = tuple(s.name for s in exp.stages[:-1]) if values["every_stage"] else ()
    return HarnessSpec(
        experiment=exp.name,
        model=exp.model,
        baseline=exp.baseline,
        tasks=tuple(tasks),
        files=files,
        num_fewshot=values["num_fewshot"],
        limit=limit,
        batch_size=values["batch_size"],
        apply_chat_template=bool(values["apply_chat_template"]),
        stages=stages,
        config_hash=exp.config_hash,
        smoke=exp.smoke,
    )


def file_sha256(path: str) -> str:
    """A task file's content hash. Task files are small and read once per parse, so they skip the
    data files' hash cache (and a parse that only validates writes nothing)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def task_files(where: str, task_yaml: str, workdir: str) -> list[str]:
    """A local task YAML and every file it reads (data files, included YAMLs, !function modules),
    as paths relative to the working directory; a missing one is a ConfigError naming it."""
    full = os.path.join(workdir, task_yaml)
    if not os.path.isfile(full):
        raise ConfigError(where, f"no task file {task_yaml!r}", "a path relative to the working directory")
    try:
        with open(full, encoding="utf-8") as handle:
            config = yaml.load(handle, Loader=_TaskYamlLoader)
    except yaml.YAMLError as err:
        raise ConfigError(where, f"task file {task_yaml!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise ConfigError(where, f"task file {task_yaml!r} is not a mapping of task settings")
    found = [task_yaml]
    here = os.path.dirname(task_yaml)
    include = config.get("include")
    if isinstance(include, str):
        found += task_files(where, os.path.join(here, include), workdir)
    for value in _tagged_functions(config):
        module = os.path.join(here, value.rsplit(".", 1)[0].replace(".", os.sep) + ".py")
        if os.path.isfile(os.path.join(workdir, module)):
            found.append(module)
    data_files = (config.get("dataset_kwargs") or {}).get("data_files")
    for pattern in _data_file_patterns(data_files):
        if _is_remote(pattern):
            continue  # a URL: `datasets` fetches it, nothing local to hash
        matches = sorted(glob.glob(os.path.join(workdir, pattern)))
        if not matches:
            raise ConfigError(
                where,
                f"task file {task_yaml!r}: data file {pattern!r} not found",
                "dataset_kwargs.data_files are relative to the working directory",
            )
        found += [os.path.relpath(m, workdir) for m in matches]
    return [os.path.normpath(f) for f in dict.fromkeys(found)]


def _data_file_patterns(data_files: Any) -> list[str]:
    """dataset_kwargs.data_files as `datasets` reads it: a path, a list, or {split: path or list}."""
    if data_files is None:
        return []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, list):
        return [str(f) for f in data_files]
    if isinstance(data_files, dict):
        return [p for value in data_files.values() for p in _data_file_patterns(value)]
    return []


def _is_remote(pattern: str) -> bool:
    return "://" in pattern


def _tagged_functions(node: Any):
    """The `module.name` of every `!function` tag in a task YAML."""
    if isinstance(node, tuple) and node[0] == "!function":
        yield node[1]
    elif isinstance(node, dict):
        for value in node.values():
            yield from _tagged_functions(value)
    elif isinstance(node, list):
        for value in node:
            yield from _tagged_functions(value)
