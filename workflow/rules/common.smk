# Config validation, wildcard constraints and input functions. All resolution
# happens once, in ftflow.config.build_plan; this file only reads the Plan.
import os
import re
import sys

from snakemake.utils import validate
from snakemake_interface_executor_plugins.settings import DeploymentMethod

sys.path.insert(0, f"{workflow.basedir}/workflow")

from ftflow.config import write_if_changed  # noqa: E402
from ftflow.workflow import (  # noqa: E402
    default_gpus,
    effective_config,
    execution_environment_or_exit,
    plan_or_exit,
    use_this_python_for_jobs,
)

SCHEMA = f"{workflow.basedir}/workflow/schemas/config.schema.yaml"
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
DEFAULT_GPUS = default_gpus()
# The Apptainer image of all jobs under --use-apptainer, for the Snakefile's container directive.
CONTAINER = execution_environment_or_exit(
    RAW_CONFIG,
    os.getcwd(),
    DeploymentMethod.APPTAINER in workflow.deployment_settings.deployment_method,
)
validate(RAW_CONFIG, SCHEMA, set_default=False)
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


def model_dir(model):
    return f"{RESULTS}/models/{PLAN.model_dir_name(model)}"


def get_stage(wildcards):
    return EXPERIMENTS[wildcards.experiment].stage(wildcards.stage)


def get_stage_base(wildcards):
    """The model folder a stage starts from: the base model, or the previous stage's merged model."""
    exp = EXPERIMENTS[wildcards.experiment]
    stage = exp.stage(wildcards.stage)
    while stage.index > 0:
        previous = exp.previous(stage)
        if stage.init_from == "merged":
            return f"{RESULTS}/{exp.name}/{previous.name}/merged"
        stage = previous
    return model_dir(exp.model)


def get_stage_adapter(wildcards):
    """The previous stage's train_metrics.json when this stage continues its adapter."""
    exp = EXPERIMENTS[wildcards.experiment]
    stage = exp.stage(wildcards.stage)
    if stage.index > 0 and stage.init_from == "adapter":
        return f"{RESULTS}/{exp.name}/{exp.previous(stage).name}/train_metrics.json"
    return []


def adapter_flag(wildcards, input):
    if input.get("adapter"):
        stage_dir = input.adapter.rsplit("/", 1)[0]
        return f"--adapter {stage_dir}/adapter"
    return ""


def get_stage_data(wildcards):
    return f"{RESULTS}/data/{get_stage(wildcards).data_id}"


def get_data_model(wildcards):
    return model_dir(PLAN.data[wildcards.data_id].model)


def get_eval_model(wildcards):
    exp = EXPERIMENTS[wildcards.experiment]
    if exp.baseline:
        return model_dir(exp.model)
    return f"{RESULTS}/{exp.name}/{exp.stages[-1].name}/merged"


def get_eval_data(wildcards):
    return f"{RESULTS}/data/{EXPERIMENTS[wildcards.experiment].eval.data_id}"


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
        paths.append(f"{RESULTS}/{exp.name}/eval/metrics.json")
        paths.extend(
            f"{RESULTS}/{exp.name}/{s.name}/train_metrics.json" for s in exp.stages
        )
    return paths


def get_final_outputs():
    return [f"{RESULTS}/report/summary.csv"]


def experiments_file():
    path = f"{RESULTS}/report/experiments.json"
    write_if_changed(path, sorted(EXPERIMENTS))
    return path


def report_title():
    return (RAW_CONFIG.get("report") or {}).get("title", "ftflow report")


onerror:
    # Failed jobs never reach the report rule; write the table anyway, to
    # results/report/partial/, so the failed experiments show as `failed` (with
    # the error's first line and the log path) beside the ones that finished.
    partial_experiments = experiments_file()
    partial_title = report_title() + " (partial: some jobs failed)"
    shell(
        "mkdir -p {LOGS} && ftflow report --results {RESULTS} --logs {LOGS}"
        " --out {RESULTS}/report/partial --experiments-file {partial_experiments:q}"
        " --title {partial_title:q} > {LOGS}/report-partial.log 2>&1 || true"
    )
