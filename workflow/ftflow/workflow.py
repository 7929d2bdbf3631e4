"""What the Snakefile needs from ftflow at parse time, in one call."""

from __future__ import annotations

import os
import sys

from .config import Plan, build_plan, check_duplicate_keys, normalize_raw
from .errors import ConfigError


def use_this_python_for_jobs() -> None:
    """Put the `ftflow` command beside the Python running Snakemake first on PATH.

    Rules call `ftflow ...`; a user who runs `.venv/bin/snakemake` without
    activating the venv still gets the matching command. (Apptainer does not
    pass the host PATH into a container, so containers use their own.)
    """
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if bindir not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bindir, path])


def effective_config(config: dict, cli_configfiles, cli_config: dict) -> dict:
    """Config files given with --configfile declare the experiments on their own;
    config.yaml (the embedded default) is used only when none is given."""
    if cli_configfiles:
        return normalize_raw(cli_config)
    return normalize_raw(config)


def plan_or_exit(raw: dict, results: str, configfiles=()) -> Plan:
    """Resolve the config; on a config error print one line naming the path and the fix, and exit."""
    try:
        for path in configfiles:
            if os.path.exists(path):
                check_duplicate_keys(path)
        plan = build_plan(raw, workdir=os.getcwd(), results=results)
        check_mixed_precision(plan, default_gpus())
        return plan
    except ConfigError as err:
        sys.stderr.write(f"ftflow config error: {err}\n")
        sys.exit(1)


def default_gpus() -> int:
    """GPUs a train or eval job asks for when its stage does not say: 1 where a GPU is, else 0."""
    import shutil

    return 1 if shutil.which("nvidia-smi") else 0


def check_mixed_precision(plan: Plan, gpus_available: int) -> None:
    """fp16/bf16 need a GPU: refuse them for a stage that will run on the CPU, before any job starts."""
    for exp in plan.experiments.values():
        for stage in exp.stages:
            gpus = stage.gpus if stage.gpus is not None else gpus_available
            for key in ("fp16", "bf16"):
                if stage.training.get(key) and gpus == 0:
                    where = "no GPU is visible here" if stage.gpus is None else "the stage sets gpus: 0"
                    raise ConfigError(
                        f"experiment {exp.name!r}, stage {stage.name!r}: training.{key}",
                        f"mixed precision needs a GPU and {where}",
                        "remove it for CPU runs, or set gpus: 1 on the stage when the jobs run on GPU nodes",
                    )
