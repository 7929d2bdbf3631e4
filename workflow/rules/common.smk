# Config validation, wildcard constraints and input functions. All resolution
# happens once, in ftflow.config.build_plan; this file only reads the Plan.
import os
import re
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

sys.path.insert(0, os.path.join(workflow.basedir, "workflow"))
# Rules call the `ftflow` command of the Python that runs Snakemake.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

from ftflow.config import build_plan, normalize_raw, write_if_changed  # noqa: E402
from ftflow.errors import ConfigError  # noqa: E402

SCHEMA = os.path.join(workflow.basedir, "workflow", "schemas", "config.schema.yaml")
RESULTS = "results"
LOGS = "logs"


def effective_config():
    # Config files given with --configfile declare the experiments on their own;
    # config.yaml (the embedded default) is used only when none is given.
    if workflow.overwrite_configfiles:
        return normalize_raw(workflow.config_settings.overwrite_config)
    return normalize_raw(config)


RAW_CONFIG = effective_config()
try:
    PLAN = build_plan(RAW_CONFIG, workdir=os.getcwd(), results=RESULTS)
except ConfigError as err:
    # One line that names the config path and the fix; a traceback would only hide it.
    sys.stderr.write(f"ftflow config error: {err}\n")
    sys.exit(1)
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
        return "--adapter " + os.path.join(os.path.dirname(input.adapter), "adapter")
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
    if stage.gpus is not None:
        return stage.gpus
    return 1 if os.environ.get("FTFLOW_GPUS_PER_JOB") or _has_gpu() else 0


def get_eval_gpus(wildcards):
    return 1 if os.environ.get("FTFLOW_GPUS_PER_JOB") or _has_gpu() else 0


def _has_gpu():
    import shutil

    return shutil.which("nvidia-smi") is not None


def get_report_inputs(wildcards=None):
    paths = []
    for exp in EXPERIMENTS.values():
        paths.append(f"{RESULTS}/{exp.name}/eval/metrics.json")
        paths.extend(f"{RESULTS}/{exp.name}/{s.name}/train_metrics.json" for s in exp.stages)
    return paths


def get_final_outputs():
    return [f"{RESULTS}/report/summary.csv"]


def experiments_file():
    path = f"{RESULTS}/report/experiments.json"
    write_if_changed(path, sorted(EXPERIMENTS))
    return path


onerror:
    # Failed jobs never reach the report rule; write the table anyway so the
    # failed experiments show as `failed` beside the ones that finished.
    shell(
        f"ftflow report --results {RESULTS} --logs {LOGS} --out {RESULTS}/report/partial "
        f"--experiments-file {experiments_file()} > {LOGS}/report-partial.log 2>&1 || true"
    )
