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
# Train and eval use every core on a CPU; smoke jobs are mostly start-up, so they run side by side.
HEAVY_THREADS = 1 if PLAN.smoke else max(1, workflow.cores or 1)


def one_of(names):
    # Exactly the names of this config: keeps results/models/{model}.json from
    # matching the output pattern results/models/{model}.
    return "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))


wildcard_constraints:
    experiment=one_of(EXPERIMENTS),
    stage=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    model=one_of(PLAN.model_dir_name(m) for m in PLAN.models),
    data_id=one_of(PLAN.data),


def get_model_dir(model):
    return LAYOUT.model_dir(PLAN.model_dir_name(model))


def get_stage(wildcards):
    return EXPERIMENTS[wildcards.experiment].stage(wildcards.stage)


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


def get_stage_adapter(wildcards):
    """The previous stage's train_metrics.json when this stage continues its adapter."""
    exp = EXPERIMENTS[wildcards.experiment]
    stage = exp.stage(wildcards.stage)
    if stage.index > 0 and stage.init_from == "adapter":
        return LAYOUT.train_metrics(exp.name, exp.previous(stage).name)
    return []


def get_adapter_flag(wildcards, input):
    """`--adapter <previous stage>/adapter` for a stage that continues an adapter, else nothing."""
    if input.get("adapter"):
        exp = EXPERIMENTS[wildcards.experiment]
        previous = exp.previous(exp.stage(wildcards.stage))
        return f"--adapter {LAYOUT.adapter_dir(exp.name, previous.name)}"
    return ""


def get_stage_data(wildcards):
    """The tokenized data of each of the stage's datasets (a mixture's members), in its order."""
    return [LAYOUT.data_dir(data_id) for data_id in get_stage(wildcards).data_ids]


def get_data_model(wildcards):
    return get_model_dir(PLAN.data[wildcards.data_id].model)


def get_eval_model(wildcards):
    exp = EXPERIMENTS[wildcards.experiment]
    if exp.baseline:
        return get_model_dir(exp.model)
    return LAYOUT.merged_dir(exp.name, exp.stages[-1].name)


def get_eval_data(wildcards):
    return LAYOUT.data_dir(EXPERIMENTS[wildcards.experiment].eval.data_id)


def get_stage_gpus(wildcards):
    stage = get_stage(wildcards)
    return stage.gpus if stage.gpus is not None else DEFAULT_GPUS


def get_eval_gpus(wildcards):
    """One GPU when the experiment trains on GPUs (its stages' or the defaults' gpus:), else DEFAULT_GPUS."""
    stages = EXPERIMENTS[wildcards.experiment].stages
    declared = [s.gpus for s in stages if s.gpus is not None]
    if not declared and (RAW_CONFIG.get("defaults") or {}).get("gpus") is not None:
        declared = [RAW_CONFIG["defaults"]["gpus"]]
    return min(1, max(declared)) if declared else DEFAULT_GPUS


def get_report_inputs(wildcards=None):
    paths = []
    for exp in EXPERIMENTS.values():
        paths.append(LAYOUT.eval_metrics(exp.name))
        paths.extend(LAYOUT.train_metrics(exp.name, s.name) for s in exp.stages)
    return paths


def get_final_outputs():
    return [LAYOUT.report_table()]
