"""Warm job start (ftflow/warm.py): a job forked from a server that holds the imports behaves
as a fresh process would: its exit status and error line, signals, and death with its client.

The smoke workflow's pinned losses (test_workflow.py) were first measured with cold starts;
the workflow runs in these tests start warm, so they also pin that warm and cold agree.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ftflow import warm
from helpers import BIN, WARM_LINE, Workspace, job_ended, raw_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def long_job(tmp_path_factory):
    """A prepared workspace whose one stage trains far longer than any test waits, and a runtime
    folder of its own, so that this module's server is its own."""
    root = tmp_path_factory.mktemp("warm")
    raw = raw_config({"long": {}}, max_steps=100_000)
    raw["defaults"]["training"]["save_steps"] = 100_000
    space = Workspace(root, raw)
    spec = space.plan.experiments["long"].stage("train")
    command = [
        str(BIN / "ftflow"),
        "train",
        "--config",
        str(space.results / "long" / "config.json"),
        "--stage",
        "train",
        "--base",
        str(space.base),
        "--data",
        *[str(space.results / "data" / d) for d in spec.data_ids],
        "--out",
        str(space.stage_dir("long")),
        "--threads",
        "1",
    ]
    runtime = root / "run"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop(warm.SWITCH, None)
    yield command, env, root
    for log in runtime.glob("ftflow-warm-*/*.log"):
        for pid in re.findall(r"ftflow warm server (\d+) ready", log.read_text()):
            try:
                os.kill(int(pid), signal.SIGTERM)
            except ProcessLookupError:
                pass


def start(command, env, log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env)


def warm_pid(log: Path, proc: subprocess.Popen, timeout: float = 300) -> int:
    """The job's pid from its first line, once training has begun."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = log.read_text(errors="replace")
        found = WARM_LINE.search(text)
        if found and "step" in text.split(found.group(0), 1)[1]:
            return int(found.group(1))
        assert proc.poll() is None, f"the job ended early ({proc.returncode}):\n{text[-3000:]}"
        time.sleep(0.1)
    raise AssertionError(f"no warm start seen:\n{log.read_text()[-3000:]}")


def test_a_job_killed_with_its_client_does_not_outlive_it(long_job):
    command, env, root = long_job
    log = root / "killed.log"
    proc = start(command, env, log)
    pid = warm_pid(log, proc)
    assert pid != proc.pid
    proc.kill()  # SIGKILL: the client cannot pass it on; the job sees its client gone
    proc.wait()
    assert job_ended(pid), "the warm job outlived its killed client"


def test_a_signal_to_the_client_reaches_the_job_and_comes_back(long_job):
    command, env, root = long_job
    log = root / "terminated.log"
    proc = start(command, env, log)
    pid = warm_pid(log, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM, "the client ends the way its job ended"
    assert job_ended(pid)


def test_a_failing_job_ends_the_same_warm_or_cold(long_job, tmp_path):
    command, env, _ = long_job
    bad = [str(BIN / "ftflow"), "evaluate", "--config", str(tmp_path / "missing.json")]
    bad += ["--model", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "eval")]
    runs = {}
    for setting in ("auto", "0"):
        proc = subprocess.run(bad, capture_output=True, text=True, env={**env, warm.SWITCH: setting}, timeout=300)
        runs[setting] = (proc.returncode, proc.stderr.strip().splitlines()[-1], proc.stderr)
    assert WARM_LINE.search(runs["auto"][2]) and not WARM_LINE.search(runs["0"][2])
    assert runs["auto"][:2] == runs["0"][:2]
    assert runs["auto"][0] != 0

    # A server that cannot start (here: its socket path is longer than a Unix socket's limit)
    # is said out loud, and the job runs cold with the same outcome.
    deep = tmp_path / ("d" * 100)
    deep.mkdir(mode=0o700)
    proc = subprocess.run(bad, capture_output=True, text=True, env={**env, "XDG_RUNTIME_DIR": str(deep)}, timeout=300)
    assert "ftflow: warm start unavailable: the warm job server exited with status 1" in proc.stderr, proc.stderr
    assert not WARM_LINE.search(proc.stderr)
    assert (proc.returncode, proc.stderr.strip().splitlines()[-1]) == runs["0"][:2]


def test_the_server_key_follows_what_imports_read():
    base = {"PATH": "/usr/bin", "HOME": "/root"}
    key = warm.server_key(base)
    assert warm.server_key({**base, "SNAKEMAKE_SOMETHING": "x"}) == key  # not read at import
    assert warm.server_key({**base, "HF_HOME": "/elsewhere"}) != key
    assert warm.server_key({**base, "OMP_NUM_THREADS": "1"}) != key
    source = Path(warm.__file__)
    st = source.stat()
    try:
        os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        assert warm.server_key(base) != key, "an edit of ftflow's source starts a new server"
    finally:
        os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize(
    "env, reason",
    [
        ({"FTFLOW_WARM": "0"}, "FTFLOW_WARM=0"),
        ({"APPTAINER_CONTAINER": "/img.sif"}, "in a container"),
        ({"SLURM_JOB_ID": "7"}, "a SLURM job"),
    ],
)
def test_jobs_start_cold_where_forking_is_not_safe(env, reason):
    assert warm.why_cold(env) == reason
