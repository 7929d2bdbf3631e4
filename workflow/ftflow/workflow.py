"""What the Snakefile needs from ftflow at parse time, in one call."""

from __future__ import annotations

import os
import sys

from .config import Plan, build_plan, check_duplicate_keys, normalize_raw
from .container import check_lock, check_sif, check_visible, export_for_jobs, image_facts
from .errors import ConfigError


def input_function(func):
    """Mark a Snakefile input function so that Snakemake reads its signature once, not per job.

    Snakemake inspects an input (or params, or resources) function's parameters
    each time it calls it, to pass only those the function takes; a
    500-experiment sweep makes thousands of such calls. Snakemake's
    overwrite_function_params stores them on the function once.
    """
    import inspect

    try:
        from snakemake.common import overwrite_function_params
    except ImportError:  # a Snakemake without it inspects the function every time, as it would anyway
        return func
    overwrite_function_params(func, inspect.signature(func).parameters)
    return func


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


def config_file_or_exit(path: str) -> None:
    """Before the Snakefile's `configfile:` reads `path`: a YAML syntax error (or a key given twice)
    prints one line naming the file, line and column, and exits. Snakemake's own message names none."""
    if not os.path.exists(path):
        return  # Snakemake says so, or --configfile replaces it
    try:
        check_config_file(path)
    except ConfigError as err:
        sys.stderr.write(f"ftflow config error: {err}\n")
        sys.exit(1)


_CHECKED: set[str] = set()  # config files already checked in this parse


def check_config_file(path: str) -> None:
    """check_duplicate_keys once per file and parse (config.yaml is checked before configfile: and again with the
    --configfile list; a large sweep file takes a noticeable time to scan)."""
    key = os.path.abspath(path)
    if key not in _CHECKED:
        check_duplicate_keys(path)
        _CHECKED.add(key)


def plan_or_exit(raw: dict, results: str, configfiles=()) -> Plan:
    """Resolve the config; on a config error print one line naming the path and the fix, and exit."""
    try:
        for path in configfiles:
            if os.path.exists(path):
                check_config_file(path)
        plan = build_plan(raw, workdir=os.getcwd(), results=results)
        check_mixed_precision(plan, default_gpus())
        return plan
    except ConfigError as err:
        sys.stderr.write(f"ftflow config error: {err}\n")
        sys.exit(1)


# Train and eval jobs side by side on a machine without GPUs, at most: two jobs of one thread did about
# 1.4x the work of one job of two threads on this project's CPU runs (small batches do not keep many
# threads busy); more than two would multiply the memory of the largest job.
CPU_JOBS_SIDE_BY_SIDE = 2


def heavy_threads(cores: int | None, experiments: int, gpus: int) -> int:
    """Threads of a train, eval or harness job: every core, or on a machine without GPUs where several
    experiments can run at once, the cores shared by two jobs."""
    cores = max(1, cores or 1)
    if gpus:
        return cores
    return max(1, cores // max(1, min(CPU_JOBS_SIDE_BY_SIDE, experiments, cores)))


def default_gpus() -> int:
    """GPUs a train or eval job asks for when its stage does not say: 1 where a GPU is, else 0.

    Counted as the GPU slot allocator counts them (FTFLOW_GPUS, CUDA_VISIBLE_DEVICES,
    nvidia-smi -L), so `CUDA_VISIBLE_DEVICES= snakemake ...` runs everything on the CPU.
    """
    from .gpu_slots import machine_gpus

    return 1 if machine_gpus()[0] else 0


# Dataset sources that are not local files (ftflow.sources.load_source).
SOURCE_SCHEMES = ("hub", "modelscope", "generator")
IMAGE_SCHEMES = ("docker", "library", "oras", "shub", "http", "https")


def container_image(raw: dict, workdir: str, required: bool) -> str | None:
    """The image of config `container:` for Snakemake's `container:` directive.

    A local path is made absolute (jobs may run from another folder) and must
    be a .sif file; with `required` (the run uses --use-apptainer) it must
    exist, so a missing image fails before any job starts.
    """
    image = raw.get("container")
    if not image:
        if required:
            raise ConfigError(
                "container",
                "--use-apptainer (or --use-singularity) is given but no image is configured",
                "set container: to a .sif path or a docker:// URI",
            )
        return None
    if "://" in image:
        scheme = image.split("://", 1)[0]
        if scheme not in IMAGE_SCHEMES:
            raise ConfigError(
                "container",
                f"unknown image scheme {scheme!r}",
                f"use a local .sif file or one of {', '.join(s + '://' for s in IMAGE_SCHEMES)}",
            )
        return image
    path = os.path.abspath(os.path.join(workdir, os.path.expanduser(image)))
    if not path.endswith(".sif"):
        raise ConfigError(
            "container",
            f"{image!r} is neither a .sif file nor an image URI",
            "build one with `make container` or use docker://...",
        )
    if required and not os.path.exists(path):
        raise ConfigError(
            "container",
            f"no image at {path}",
            "build it with `make container`, or point container: at an existing .sif",
        )
    return path


def export_hf_home(raw: dict, workdir: str) -> str | None:
    """Point every job's Hugging Face cache at config `hf_home` (or the caller's HF_HOME).

    Jobs inherit the environment (local jobs, SLURM's --export=ALL and
    Apptainer alike); the folder is also added to APPTAINER_BIND so a job in a
    container reads and writes the same cache. Returns the folder, if any.
    """
    configured = raw.get("hf_home")
    if configured:
        os.environ["HF_HOME"] = os.path.abspath(os.path.join(workdir, os.path.expanduser(configured)))
    folder = os.environ.get("HF_HOME")
    if not folder:
        return None
    os.makedirs(folder, exist_ok=True)  # Apptainer refuses to bind a missing folder
    for variable in ("APPTAINER_BIND", "SINGULARITY_BIND"):
        binds = [b for b in os.environ.get(variable, "").split(",") if b]
        if folder not in binds:
            os.environ[variable] = ",".join([*binds, folder])
    return folder


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


def job_paths(plan: Plan, workdir: str, env: dict) -> list[tuple[str, str]]:
    """(config key, host path) of everything outside the image a job reads or writes, besides results/ and logs/."""
    from .gpu_slots import slots_folder
    from .sources import local_files

    needed = []
    for name, dataset in plan.datasets.items():
        sources = dataset.source if isinstance(dataset.source, dict) else {None: dataset.source}
        for split, pattern in sources.items():
            if isinstance(pattern, str) and (":" not in pattern or pattern.partition(":")[0] not in SOURCE_SCHEMES):
                key = f"datasets.{name}.source" + (f".{split}" if split else "")
                needed += [(key, file) for file in local_files(pattern, workdir)]
    for name, model in plan.models.items():
        if model.path:
            needed.append((f"models.{name}.path", os.path.abspath(os.path.join(workdir, model.path))))
    if env.get("HF_HOME"):
        needed.append(("hf_home (or HF_HOME)", env["HF_HOME"]))
    if env.get("FTFLOW_GPU_SLOTS_DIR") or default_gpus():
        needed.append(("the GPU slot folder (FTFLOW_GPU_SLOTS_DIR or the temp folder)", slots_folder(env)))
    return needed


def lock_file() -> str:
    """envs/requirements.txt of the source tree this ftflow runs from."""
    return os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "envs", "requirements.txt"
    )


def execution_environment_or_exit(
    raw: dict, workdir: str, use_apptainer: bool, plan: Plan | None = None, apptainer_args: str | None = None
) -> str | None:
    """Export the jobs' HF cache and resolve the container image; a config error prints one line and exits.

    Under --use-apptainer a local image is checked (a SIF file, built from this
    tree's lock), every path the jobs need must be visible inside it, and the
    jobs are told which image they must run in (ftflow.container).
    """
    try:
        export_hf_home(raw, workdir)
        image = container_image(raw, workdir, use_apptainer)
        if not use_apptainer or image is None:
            return image
        facts = None
        if "://" not in image:
            check_sif(image)
            facts = image_facts(image, workdir)
            check_lock(image, facts["lock_sha256"], lock_file())
        if plan is not None:
            check_visible(job_paths(plan, workdir, dict(os.environ)), workdir, dict(os.environ), apptainer_args)
        export_for_jobs(image, facts)
        return image
    except ConfigError as err:
        sys.stderr.write(f"ftflow config error: {err}\n")
        sys.exit(1)
