# Config validation, wildcard constraints and input functions. All resolution
# happens once, in ftflow.config.build_plan (which also checks the schema);
# this file only reads the Plan, and every path comes from ftflow.paths.Layout.
import os
import re
import sys

from snakemake_interface_executor_plugins.settings import DeploymentMethod

sys.path.insert(0, f"{workflow.basedir}/workflow")

from ftflow.paths import Layout  # noqa: E402
from ftflow.workflow import (  # noqa: E402
    default_gpus,
    effective_config,
    execution_environment_or_exit,
    heavy_threads,
    input_function,
    plan_or_exit,
    use_this_python_for_jobs,
)

RESULTS = "results"
LOGS = "logs"

use_this_python_for_jobs()
RAW_CONFIG = effective_config(
    config, workflow.overwrite_configfiles, workflow.config_settings.overwrite_config
)
PLAN = plan_or_exit(
    RAW_CONFIG,
    RESULTS,
    configfiles=workflow.overwrite_configfiles or workflow.configfiles,
)
LAYOUT = Layout(RESULTS, LOGS)
DEFAULT_GPUS = default_gpus()
# The Apptainer image of all jobs under --use-apptainer, for the Snakefile's container directive.
# Under --use-apptainer: the image is checked and every path the jobs need must be visible in it.
CONTAINER = execution_environment_or_exit(
    RAW_CONFIG,
    os.getcwd(),
    DeploymentMethod.APPTAINER in workflow.deployment_settings.deployment_method,
    plan=PLAN,
    apptainer_args=workflow.deployment_settings.apptainer_args,
)
PLAN.write_specs()
EXPERIMENTS = PLAN.experiments
# Train and eval threads: every core, shared by two jobs on a CPU machine with several experiments.
# Smoke jobs are mostly start-up: one thread (and `workflow.cores` is not asked, --unlock has none).
HEAVY_THREADS = (
    1 if PLAN.smoke else heavy_threads(workflow.cores, len(EXPERIMENTS), DEFAULT_GPUS)
)


def one_of(names):
    # Exactly the names of this config: keeps results/models/{model}.json from
    # matching the output pattern results/models/{model}.
    return "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))


wildcard_constraints:
    # a search's trials join EXPERIMENTS (and may add data_ids) as its rounds are planned
    experiment=one_of(EXPERIMENTS) + PLAN.trial_name_pattern(),
    stage=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    model=one_of(PLAN.model_dir_name(m) for m in PLAN.models),
    data_id=one_of(PLAN.data) + PLAN.trial_data_pattern(),
    search=one_of(PLAN.searches),
    round=r"\d+",


def get_model_dir(model):
    return LAYOUT.model_dir(PLAN.model_dir_name(model))


def get_stage(wildcards):
    return EXPERIMENTS[wildcards.experiment].stage(wildcards.stage)


@input_function
def get_stage_base(wildcards):
    """The model folder a stage starts from: the base model, or the previous stage's merged model."""
    exp = EXPERIMENTS[wildcards.experiment]
    stage = exp.stage(wildcards.stage)
    while stage.index > 0:
        previous = exp.previous(stage)
        if stage.init_from == "merged":
            return LAYOUT.merged_dir(exp.name, previous.name)
        stage = previous
    return get_model_dir(exp.model)


@input_function
def get_stage_adapter(wildcards):
    """The previous stage's train_metrics.json when this stage continues its adapter."""
    exp = EXPERIMENTS[wildcards.experiment]
    stage = exp.stage(wildcards.stage)
    if stage.index > 0 and stage.init_from == "adapter":
        return LAYOUT.train_metrics(exp.name, exp.previous(stage).name)
    return []


@input_function
def get_adapter_flag(wildcards, input):
    """`--adapter <previous stage>/adapter` for a stage that continues an adapter, else nothing."""
    if input.get("adapter"):
        exp = EXPERIMENTS[wildcards.experiment]
        previous = exp.previous(exp.stage(wildcards.stage))
        return f"--adapter {LAYOUT.adapter_dir(exp.name, previous.name)}"
    return ""


@input_function
def get_stage_data(wildcards):
    """The tokenized data of each of the stage's datasets (a mixture's members), in its order."""
    return [LAYOUT.data_dir(data_id) for data_id in get_stage(wildcards).data_ids]


@input_function
def get_data_model(wildcards):
    return get_model_dir(PLAN.data[wildcards.data_id].model)


@input_function
def get_eval_model(wildcards):
    exp = EXPERIMENTS[wildcards.experiment]
    if exp.baseline:
        return get_model_dir(exp.model)
    return LAYOUT.merged_dir(exp.name, exp.stages[-1].name)


@input_function
def get_eval_data(wildcards):
    return LAYOUT.data_dir(EXPERIMENTS[wildcards.experiment].eval.data_id)


@input_function
def get_stage_gpus(wildcards):
    stage = get_stage(wildcards)
    return stage.gpus if stage.gpus is not None else DEFAULT_GPUS


@input_function
def get_eval_gpus(wildcards):
    """One GPU when the experiment trains on GPUs (its stages' or the defaults' gpus:), else DEFAULT_GPUS."""
    stages = EXPERIMENTS[wildcards.experiment].stages
    declared = [s.gpus for s in stages if s.gpus is not None]
    if not declared and (RAW_CONFIG.get("defaults") or {}).get("gpus") is not None:
        declared = [RAW_CONFIG["defaults"]["gpus"]]
    return min(1, max(declared)) if declared else DEFAULT_GPUS


@input_function
def get_failure_flag(wildcards):
    """`--record-failure` for a search trial's own jobs: its failure is recorded as its outcome (status
    failed), so the round goes on; an experiment of the config (even one a trial reuses) fails loudly.
    """
    trials = PLAN.trials.experiment_of
    return (
        "--record-failure"
        if trials.get(wildcards.experiment) == wildcards.experiment
        else ""
    )


def get_earlier_rounds(wildcards):
    """round-{j}.json of every round of the search before this one, in order."""
    return [
        LAYOUT.search_round(wildcards.search, j) for j in range(int(wildcards.round))
    ]


def get_round_experiments(wildcards):
    """The experiments that run a search round's trials, once its checkpoint has planned them."""
    planned = checkpoints.search_plan.get(
        search=wildcards.search, round=wildcards.round
    )
    return PLAN.add_round_trials(planned.output.trials)


def get_round_results(wildcards):
    return [LAYOUT.eval_metrics(name) for name in get_round_experiments(wildcards)]


def get_search_rounds(wildcards):
    rounds = PLAN.searches[wildcards.search].rounds
    return [LAYOUT.search_round(wildcards.search, k) for k in range(len(rounds))]


def get_last_round_spec(wildcards):
    rounds = PLAN.searches[wildcards.search].rounds
    return LAYOUT.search_round_spec(wildcards.search, len(rounds) - 1)


def get_harness_model(wildcards):
    """The model a harness job benchmarks: the final model (as eval's), or the merged model after an earlier stage."""
    if "stage" in wildcards.keys():
        return LAYOUT.merged_dir(wildcards.experiment, wildcards.stage)
    return get_eval_model(wildcards)


def get_harness_outputs(names=None):
    """eval/harness.json of every experiment (or of `names`) with eval.harness tasks, and its every_stage results."""
    paths = []
    for name in PLAN.harness if names is None else names:
        spec = PLAN.harness.get(name)
        if spec is not None:
            paths.append(LAYOUT.harness_results(name))
            paths.extend(LAYOUT.harness_results(name, stage) for stage in spec.stages)
    return paths


def get_trial_harness_outputs(wildcards):
    """The benchmarks of every search trial, as its round is planned (a trial's eval.harness is its base's).

    The report waits for them, the search's rounds do not: a search's metric is a number of its task eval.
    """
    names = []
    for search, spec in PLAN.searches.items():
        for k in range(len(spec.rounds)):
            planned = checkpoints.search_plan.get(search=search, round=k)
            names.extend(PLAN.add_round_trials(planned.output.trials))
    return get_harness_outputs(dict.fromkeys(names))


# Inputs, params and resources that are the same for every job of a rule are given as values, not
# functions: Snakemake calls a function once per job (1,500 jobs in a 500-experiment sweep).
STAGES = [stage for exp in EXPERIMENTS.values() for stage in exp.stages]
CONTINUES_ADAPTER = any(s.index > 0 and s.init_from == "adapter" for s in STAGES)
STAGE_ADAPTER = get_stage_adapter if CONTINUES_ADAPTER else []
ADAPTER_FLAG = get_adapter_flag if CONTINUES_ADAPTER else ""
GPUS_DECLARED = any(s.gpus is not None for s in STAGES) or (
    (RAW_CONFIG.get("defaults") or {}).get("gpus") is not None
)
STAGE_GPUS = get_stage_gpus if GPUS_DECLARED else DEFAULT_GPUS
EVAL_GPUS = get_eval_gpus if GPUS_DECLARED else DEFAULT_GPUS
RECORD_FAILURE = get_failure_flag if PLAN.searches else ""
TRIAL_HARNESS = get_trial_harness_outputs if PLAN.searches else []


def get_report_inputs(wildcards=None):
    paths = []
    for exp in EXPERIMENTS.values():
        if PLAN.trials and exp.name in PLAN.trials.experiment_of:
            continue  # a search's trials reach the report through its best.json
        # eval/metrics.json only: every stage's train_metrics.json is upstream of it (eval <- merge <-
        # train, each stage starting from the one before), so listing them would only make Snakemake
        # resolve each one again (1,000 more file lookups in a 500-experiment dry run)
        paths.append(LAYOUT.eval_metrics(exp.name))
    paths.extend(LAYOUT.search_best(name) for name in PLAN.searches)
    trials = PLAN.trials.experiment_of if PLAN.trials else {}
    # a trial's benchmarks come through the report's trial_harness input, as its round is planned
    paths.extend(
        get_harness_outputs([name for name in PLAN.harness if name not in trials])
    )
    return paths


def get_final_outputs():
    return [LAYOUT.report_table()]
