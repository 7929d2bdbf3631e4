"""What the Snakefile needs from ftflow at parse time, in one call."""

from __future__ import annotations

import os
import sys

from .config import Plan, build_plan, normalize_raw
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


def plan_or_exit(raw: dict, results: str) -> Plan:
    """Resolve the config; on a config error print one line naming the path and the fix, and exit."""
    try:
        return build_plan(raw, workdir=os.getcwd(), results=results)
    except ConfigError as err:
        sys.stderr.write(f"ftflow config error: {err}\n")
        sys.exit(1)


def default_gpus() -> int:
    """GPUs a train or eval job asks for when its stage does not say: 1 where a GPU is, else 0."""
    import shutil

    return 1 if shutil.which("nvidia-smi") else 0
