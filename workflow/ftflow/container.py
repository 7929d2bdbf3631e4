"""Jobs in an Apptainer image: what the run checks before any job, and what each job records.

Before any job (the Snakefile, under --use-apptainer / --use-singularity):
  - a local image must be a readable SIF file, and the lock it was built from
    (/opt/ftflow/lock.sha256, written by containers/install.sh) must be the
    working tree's envs/requirements.txt; the image's SHA-256 and its lock hash
    are cached in .snakemake/ftflow-images.json by size and mtime;
  - every host path the jobs read or write (local datasets and models, the
    Hugging Face cache, the GPU slot folder) must be visible inside the
    container at the same path: the working folder, /tmp and /var/tmp, and the
    binds of APPTAINER_BIND / SINGULARITY_BIND and --apptainer-args;
  - the image, its SHA-256 and its lock hash are exported to the jobs
    (FTFLOW_CONTAINER, ...), also as APPTAINERENV_* so --cleanenv keeps them.

In each job (ftflow's command line): a job asked to run in an image that finds
itself outside it (no APPTAINER_CONTAINER, or another image) stops with one
line; otherwise `runtime()` says where it runs, for the job's log and the
provenance of its metrics.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import subprocess

from .errors import ConfigError, FtflowError

IMAGE_ENV = "FTFLOW_CONTAINER"
IMAGE_SHA_ENV = "FTFLOW_CONTAINER_SHA256"
LOCK_SHA_ENV = "FTFLOW_CONTAINER_LOCK_SHA256"
LOCK_IN_IMAGE = "/opt/ftflow/lock.sha256"
SIF_MAGIC = b"SIF_MAGIC"
CACHE = os.path.join(".snakemake", "ftflow-images.json")
# Mounted by Apptainer's defaults (mount tmp = yes); --contain and --containall drop them.
DEFAULT_VISIBLE = ("/tmp", "/var/tmp")
CONTAIN_FLAGS = ("-c", "--contain", "-C", "--containall")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- before any job


def check_sif(path: str) -> None:
    """A local image is a readable SIF file; else one line saying which and how to fix it."""
    if not os.path.exists(path):
        raise ConfigError(
            "container", f"no image at {path}", "build it with `make container`, or point container: at a .sif"
        )
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ConfigError("container", f"{path} is not a readable file", "check its permissions, or rebuild it")
    with open(path, "rb") as handle:
        header = handle.read(64)
    if SIF_MAGIC not in header:
        raise ConfigError("container", f"{path} is not a SIF image", "build it with `apptainer build` (make container)")


def image_lock(path: str, engine: str = "apptainer") -> str:
    """The lock hash the image records (containers/install.sh writes it), read with `apptainer exec`."""
    try:
        proc = subprocess.run(
            [engine, "exec", "--contain", "--cleanenv", path, "cat", LOCK_IN_IMAGE],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except (OSError, subprocess.SubprocessError) as err:
        raise ConfigError("container", f"cannot run `{engine} exec` on {path}: {err}") from None
    value = proc.stdout.strip()
    if proc.returncode != 0 or len(value) != 64:
        said = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(
            "container",
            f"{path} has no readable {LOCK_IN_IMAGE} ({said})",
            "build the image from containers/Apptainer.def or Apptainer-debian.def, whose install records the lock",
        )
    return value


def image_facts(path: str, workdir: str, engine: str = "apptainer") -> dict:
    """The image's SHA-256 and lock hash, cached in the working folder by the image's size and mtime."""
    cache_path = os.path.join(workdir, CACHE)
    stat = os.stat(path)
    key = f"{os.path.realpath(path)}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        with open(cache_path, encoding="utf-8") as handle:
            cache = json.load(handle)
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict) or not isinstance(cache.get(key), dict):
        cache = cache if isinstance(cache, dict) else {}
        cache[key] = {"sha256": file_sha256(path), "lock_sha256": image_lock(path, engine)}
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        tmp = f"{cache_path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(cache, handle, indent=1)
        os.replace(tmp, cache_path)
    return cache[key]


def check_lock(image: str, image_lock_sha: str, lock_file: str) -> None:
    """The image was built from this working tree's lock; else one line with both hashes."""
    if not os.path.isfile(lock_file):
        return  # ftflow installed without its source tree: nothing to compare
    here = file_sha256(lock_file)
    if here != image_lock_sha:
        raise ConfigError(
            "container",
            f"{image} was built from another lock (its envs/requirements.txt has sha256 {image_lock_sha[:12]}, "
            f"this working tree's {here[:12]})",
            "rebuild the image (make container), or check out the commit it was built from",
        )


def bind_specs(env: dict, apptainer_args: str | None) -> list[str]:
    """Every bind the container gets: APPTAINER_BIND, SINGULARITY_BIND and -B/--bind of --apptainer-args."""
    specs = []
    for variable in ("APPTAINER_BIND", "SINGULARITY_BIND", "APPTAINER_BINDPATH", "SINGULARITY_BINDPATH"):
        specs += [s for s in env.get(variable, "").split(",") if s]
    words = shlex.split(apptainer_args or "")
    for i, word in enumerate(words):
        if word in ("-B", "--bind") and i + 1 < len(words):
            specs += [s for s in words[i + 1].split(",") if s]
        elif word.startswith(("--bind=", "-B=")):
            specs += [s for s in word.split("=", 1)[1].split(",") if s]
    return specs


def visible_folders(workdir: str, env: dict, apptainer_args: str | None) -> tuple[list[str], dict[str, str]]:
    """Host folders a job sees at the same path, and binds that mount a host folder elsewhere (source: target)."""
    contained = any(word in CONTAIN_FLAGS for word in shlex.split(apptainer_args or ""))
    visible = [os.path.abspath(workdir)] + ([] if contained else list(DEFAULT_VISIBLE))
    moved = {}
    for spec in bind_specs(env, apptainer_args):
        source, _, rest = spec.partition(":")
        target = rest.partition(":")[0] or source
        if target == source:
            visible.append(os.path.abspath(source))
        else:
            moved[os.path.abspath(source)] = target
    return visible, moved


def _under(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_visible(needed: list[tuple[str, str]], workdir: str, env: dict, apptainer_args: str | None) -> None:
    """Each (config key, host path) a job needs is visible in the container; else one line naming the bind to add."""
    visible, moved = visible_folders(workdir, env, apptainer_args)
    for key, path in needed:
        if any(_under(path, folder) for folder in visible):
            continue
        elsewhere = next((f"{source}:{target}" for source, target in moved.items() if _under(path, source)), None)
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        problem = f"{path} is not visible in the container"
        if elsewhere:
            problem += f" at the same path (the bind {elsewhere} mounts it elsewhere)"
        else:
            problem += f" (it sees the working folder {os.path.abspath(workdir)}, /tmp, /var/tmp and the binds)"
        raise ConfigError(key, problem, f'add --apptainer-args "--bind {folder}" (or APPTAINER_BIND={folder})')


def export_for_jobs(image: str, facts: dict | None) -> None:
    """Tell every job which image it must run in (plain and APPTAINERENV_, which --cleanenv keeps)."""
    values = {IMAGE_ENV: image}
    if facts:
        values[IMAGE_SHA_ENV] = facts["sha256"]
        values[LOCK_SHA_ENV] = facts["lock_sha256"]
    for name, value in values.items():
        os.environ[name] = value
        os.environ[f"APPTAINERENV_{name}"] = value


# --------------------------------------------------------------------------- in each job


def running_image(env: dict | None = None) -> str | None:
    """The image this process runs in (Apptainer sets APPTAINER_CONTAINER inside), or None on the host."""
    env = os.environ if env is None else env
    return env.get("APPTAINER_CONTAINER") or env.get("SINGULARITY_CONTAINER") or None


def runtime(env: dict | None = None) -> dict:
    """Where this job runs: the host, or the image (path, SHA-256, the lock hash recorded inside).

    Raises FtflowError when the job was asked to run in an image (FTFLOW_CONTAINER)
    and runs on the host or in another image.
    """
    env = os.environ if env is None else env
    asked = env.get(IMAGE_ENV)
    inside = running_image(env)
    if asked and not inside:
        raise FtflowError(
            f"this job was to run in the image {asked} (snakemake --use-apptainer) but runs on the host; "
            "check that its rule has the container directive and that `apptainer` is the real engine"
        )
    if not inside:
        return {"where": "host", "host": platform.node()}
    local = asked and "://" not in asked
    if local and os.path.realpath(inside) != os.path.realpath(asked):
        raise FtflowError(f"this job runs in the image {inside}, not in {asked} that the run asked for")
    try:
        with open(LOCK_IN_IMAGE, encoding="utf-8") as handle:
            lock = handle.read().strip() or None
    except OSError:
        lock = None
    return {
        "where": "image",
        "image": asked or inside,
        "image_sha256": env.get(IMAGE_SHA_ENV) if local else None,
        "lock_sha256": lock,
        "host": platform.node(),
    }


def describe(where: dict | None) -> str:
    """Where a runtime record says a job ran: `on the host` or `in image NAME (sha256 ..., lock ...)`."""
    if not where:
        return "somewhere unrecorded"
    if where.get("where") != "image":
        return "on the host"
    image = where.get("image") or "?"
    name = image if "://" in image else os.path.basename(image)
    labels = (("image_sha256", "sha256"), ("lock_sha256", "lock"))
    hashes = [f"{label} {where[key][:12]}" for key, label in labels if where.get(key)]
    return f"in image {name}" + (f" ({', '.join(hashes)})" if hashes else "")
