"""Jobs in a real Apptainer image, end to end: `make test-container` (needs root; not in `make test`).

- tests/container/bringup.sh brings up Apptainer (Debian sid's package in a
  debootstrapped root, reused when present) and puts an `apptainer` shim on PATH.
- containers/Apptainer-debian.def is built (the same install script as the CUDA
  definition); torch's CPU wheel comes from pip's find-links folder when one
  holds it. FTFLOW_TEST_IMAGE_DIR (default /var/tmp/ftflow-test-images) keeps
  the image under the hash of its inputs, so an unchanged tree reuses it.
- tests/configs/container.yaml's smoke workflow runs from a clean folder with
  `snakemake --use-singularity` (every job, then the report), from another with
  `--use-apptainer` (the model and data jobs), and on the host. Every job must
  have run in the image (its log line, and the provenance of the metrics: the
  image, its SHA-256 and the lock hash inside it), and the results must equal
  the host's: the same data ids and rows, the same metrics, the same losses
  where the library versions match.

The times of bring-up, image build and the runs are printed (`pytest -s`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftflow.container import file_sha256
from helpers import REPO, snakemake

pytestmark = [pytest.mark.container, pytest.mark.workflow, pytest.mark.slow]

DEF = REPO / "containers" / "Apptainer-debian.def"
CONFIG = REPO / "tests" / "configs" / "container.yaml"
LOCK = REPO / "envs" / "requirements.txt"
# What the image is built from: a change to any of them builds a new one.
IMAGE_INPUTS = ["containers/Apptainer-debian.def", "containers/install.sh", "envs/requirements.txt", "pyproject.toml"]
IMAGE_FOLDERS = ["workflow/ftflow", "workflow/schemas"]
TIMES: dict[str, float] = {}


def timed(name: str, command: list[str], **kwargs) -> subprocess.CompletedProcess:
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, **kwargs)
    TIMES[name] = time.perf_counter() - started
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def inputs_hash() -> str:
    digest = hashlib.sha256()
    files = [REPO / p for p in IMAGE_INPUTS]
    for folder in IMAGE_FOLDERS:
        files += sorted(p for p in (REPO / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    files.append(REPO / "README.md")
    for path in files:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def local_pip_settings() -> tuple[list[str], list[str]]:
    """Build options that carry this machine's pip settings into the image build, and the host folders they need.

    pip's find-links folder, when it holds the CPU build of the lock's torch, is
    bound at /mnt (WHEELS); pip's CA bundle (PyPI through a proxy the image does
    not trust), at /srv (PIP_CERT). Both targets exist in a debootstrapped root.
    """
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    options, folders = [], []
    links = re.findall(r"find-links='([^']*)'", listed) + os.environ.get("PIP_FIND_LINKS", "").split()
    wheels = [f for f in " ".join(links).split() if glob.glob(os.path.join(f, "torch-2.13.0+cpu-*.whl"))]
    if wheels:
        options += ["--bind", f"{wheels[0]}:/mnt", "--build-arg", "WHEELS=/mnt"]
        folders.append(wheels[0])
    certs = re.findall(r"\bcert='([^']*)'", listed) + [os.environ.get("PIP_CERT", "")]
    cert = next((c for c in certs if c and os.path.isfile(c)), None)
    if cert:
        folder, name = os.path.split(os.path.realpath(cert))
        options += ["--bind", f"{folder}:/srv", "--build-arg", f"PIP_CERT=/srv/{name}"]
        folders.append(folder)
    return options, folders


@pytest.fixture(scope="module")
def apptainer_path(tmp_path_factory) -> str:
    if os.geteuid() != 0:
        pytest.skip("the Apptainer bring-up needs root (debootstrap, unshare --mount, pivot_root)")
    bin_dir = tmp_path_factory.mktemp("apptainer-bin")
    proc = timed("bring-up", ["bash", str(REPO / "tests" / "container" / "bringup.sh"), str(bin_dir)], timeout=1800)
    assert re.search(r"apptainer version 1\.\d+", proc.stdout), proc.stdout
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


@pytest.fixture(scope="module")
def image(apptainer_path) -> Path:
    folder = Path(os.environ.get("FTFLOW_TEST_IMAGE_DIR", "/var/tmp/ftflow-test-images"))
    path = folder / f"ftflow-debian-{inputs_hash()}.sif"
    if path.exists():
        TIMES["image build (reused)"] = 0.0
        return path
    folder.mkdir(parents=True, exist_ok=True)
    options, folders = local_pip_settings()
    command = ["apptainer", "build", *options, str(path), str(DEF.relative_to(REPO))]
    env = {**os.environ, "PATH": apptainer_path, "FTFLOW_APPTAINER_EXTRA_BINDS": ":".join(folders)}
    timed("image build", command, cwd=REPO, env=env, timeout=3600)
    return path


def write_data(workdir: Path) -> None:
    """The config's data/qa.jsonl: 24 short chats, a relative path in the working folder."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": str(2 * i)},
            ]
        }
        for i in range(24)
    ]
    (workdir / "data").mkdir(parents=True)
    (workdir / "data" / "qa.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (workdir / "config.yaml").write_text(CONFIG.read_text())


def run_workflow(name: str, workdir: Path, *args: str, env: dict | None = None) -> None:
    started = time.perf_counter()
    snakemake(workdir, "--cores", "2", *args, env=env, timeout=1800)
    TIMES[name] = time.perf_counter() - started


def container_env(apptainer_path: str) -> dict:
    # PYTHONPATH would reach the jobs through Apptainer; the image's ftflow must answer
    return {"PATH": apptainer_path, "PYTHONPATH": ""}


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, apptainer_path, image) -> Path:
    workdir = tmp_path_factory.mktemp("in-image")
    write_data(workdir)
    run_workflow(
        "workflow run --use-singularity",
        workdir,
        "--use-singularity",
        f"--config=container={image}",
        env=container_env(apptainer_path),
    )
    return workdir


@pytest.fixture(scope="module")
def host_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("on-host")
    write_data(workdir)
    run_workflow("workflow run on the host", workdir)
    return workdir


def job_logs(workdir: Path) -> list[Path]:
    return sorted(p for p in (workdir / "logs").rglob("*.log") if p.is_file())


def metrics_files(workdir: Path) -> list[Path]:
    return sorted((workdir / "results").glob("*/train/train_metrics.json")) + sorted(
        (workdir / "results").glob("*/eval/metrics.json")
    )


def test_every_job_ran_in_the_image(image_run, image):
    sha, lock = file_sha256(str(image)), file_sha256(str(LOCK))
    line = f"ftflow: this job runs in image {image.name} (sha256 {sha[:12]}, lock {lock[:12]})"
    logs = job_logs(image_run)
    assert len(logs) >= 5, logs  # prepare_model, tokenize, train, merge, evaluate, report
    for log in logs:
        text = log.read_text()
        assert line in text, f"{log}:\n{text[-2000:]}"
        assert "runs on the host" not in text, log
    files = metrics_files(image_run)
    assert len(files) == 2, files
    for path in files:
        runtime = json.loads(path.read_text())["provenance"]["runtime"]
        assert runtime["where"] == "image" and runtime["image"] == str(image), (path, runtime)
        assert runtime["image_sha256"] == sha and runtime["lock_sha256"] == lock, (path, runtime)
    report = (image_run / "results" / "report" / "report.md").read_text()
    assert f"Where: every run ran in image {image.name} (sha256 {sha[:12]}, lock {lock[:12]})." in report


def test_use_apptainer_from_a_clean_folder(tmp_path, apptainer_path, image, image_run):
    write_data(tmp_path)
    data = sorted(p.name for p in (image_run / "results" / "data").iterdir() if p.is_dir())
    targets = ["results/models/smol.smoke", *(f"results/data/{d}" for d in data)]
    run_workflow(
        "workflow run --use-apptainer (model and data jobs)",
        tmp_path,
        "--use-apptainer",
        f"--config=container={image}",
        *targets,
        env=container_env(apptainer_path),
    )
    logs = job_logs(tmp_path)
    assert len(logs) == 1 + len(data), logs
    assert all(f"this job runs in image {image.name}" in log.read_text() for log in logs)
    for d in data:
        stats = [json.loads((run / "results" / "data" / d / "stats.json").read_text()) for run in (tmp_path, image_run)]
        assert comparable(stats[0]) == comparable(stats[1])


def comparable(value):
    """A metrics file without what differs by run: provenance, times, speeds and memory."""
    skip = re.compile(r"provenance|seconds|time|per_second|tokens_per|rss|memory|_mb$|date")
    if isinstance(value, dict):
        return {key: comparable(item) for key, item in value.items() if not skip.search(key)}
    if isinstance(value, list):
        return [comparable(item) for item in value]
    return value


def assert_close(a, b, where: str = "", rel: float = 1e-5) -> None:
    """The same structure and values; floats within `rel` of each other."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_close(a[key], b[key], f"{where}.{key}", rel)
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]", rel)
    elif isinstance(a, float) or isinstance(b, float):
        assert b == pytest.approx(a, rel=rel), where
    else:
        assert a == b, where


def test_results_equal_the_hosts(image_run, host_run):
    data = sorted(p.name for p in (host_run / "results" / "data").iterdir() if p.is_dir())
    assert data == sorted(p.name for p in (image_run / "results" / "data").iterdir() if p.is_dir())
    for d in data:
        stats = [json.loads((run / "results" / "data" / d / "stats.json").read_text()) for run in (host_run, image_run)]
        assert comparable(stats[0]) == comparable(stats[1])
    host_files, image_files = metrics_files(host_run), metrics_files(image_run)
    assert [p.relative_to(host_run) for p in host_files] == [p.relative_to(image_run) for p in image_files]
    for host_file, image_file in zip(host_files, image_files):
        host, inside = json.loads(host_file.read_text()), json.loads(image_file.read_text())
        assert host["provenance"]["runtime"]["where"] == "host"
        same_versions = host["provenance"]["packages"] == inside["provenance"]["packages"]
        if same_versions:
            assert_close(comparable(host), comparable(inside), host_file.name)
        else:  # other library versions: the same keys, the same task metrics
            assert comparable(host).keys() == comparable(inside).keys()
    host_eval = json.loads((host_run / "results" / "lora" / "eval" / "metrics.json").read_text())
    image_eval = json.loads((image_run / "results" / "lora" / "eval" / "metrics.json").read_text())
    assert host_eval["metrics"] == image_eval["metrics"]


def test_times(image_run, host_run):
    """Not a check: the measured times, for the README (`make test-container` shows them)."""
    for name, seconds in TIMES.items():
        print(f"container test time: {name}: {seconds:.0f} s")
