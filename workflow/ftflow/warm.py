"""Warm job start: job processes forked from a server that has already imported torch.

Every training, merge, eval, harness and tokenize job is its own process, and
on a CPU machine each spends 8-13 s importing torch, transformers, peft and
datasets before it does anything: a smoke run of the embedded default spends
most of its time there. On such a machine the `ftflow` command of a job asks a
per-user server that holds those imports to fork a child for it; the child
takes the job's working folder, environment, umask, arguments and standard
streams (passed over a Unix socket), runs the same `ftflow` command line a
fresh process would, and its exit status comes back as the command's.

When it is used (FTFLOW_WARM unset or `auto`): Linux, no NVIDIA device on
the machine (a process forked after CUDA is touched cannot use CUDA), not in a
container, not a SLURM job, and a job that does not need bitsandbytes (the
server hides it: QLoRA stages start cold). FTFLOW_WARM=0 turns it off.
Anything that goes wrong before the job is forked falls back to a cold start.

Soundness: one server per key, the hash of the interpreter, ftflow's source
files (path, size, mtime), the site-packages folders' mtimes and every
environment variable a library may read at import (HF_*, TORCH*, OMP_*, ...);
a job whose key differs gets its own server, so an edit of ftflow or of
HF_HOME is never served from stale imports. The server runs no job code and no
tensor op itself; it is single-threaded on the Python side and forks from its
main loop. A child whose client goes away (snakemake killed with SIGKILL)
kills itself; signals the client receives (SIGTERM, SIGINT, SIGHUP) are passed
to the child. The server exits after IDLE_SECONDS without jobs.

This module is the client side and the rules of when; warm_server.py is the
server. Standard library only: the client must cost nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

SWITCH = "FTFLOW_WARM"
IDLE_SECONDS = 120.0
READY_SECONDS = 300.0  # a server's imports on a loaded machine
# Environment variables a library may read once, at import time.
KEY_PREFIXES = (
    "HF_",
    "HUGGINGFACE_",
    "TRANSFORMERS_",
    "DATASETS_",
    "TOKENIZERS_",
    "TORCH",
    "PYTORCH_",
    "CUDA_",
    "NVIDIA_",
    "OMP_",
    "MKL_",
    "OPENBLAS_",
    "KMP_",
    "BNB_",
    "PYTHON",
    "LD_",
    "VIRTUAL_ENV",
    "XDG_",
    "FTFLOW_",
    "APPTAINER",
    "SINGULARITY",
    "SLURM_",
)
KEY_NAMES = ("HOME", "TMPDIR", "PATH", "LANG", "LC_ALL", "TZ")
HEADER = struct.Struct("!I")

# Set in a server's child (warm_server.py): the command line it runs must not ask for a server again.
IN_CHILD = False


# --------------------------------------------------------------------------- when


def why_cold(environ=os.environ) -> str | None:
    """None when this job may start warm; otherwise the reason it starts cold."""
    setting = environ.get(SWITCH, "auto").strip().lower()
    if IN_CHILD:
        return "already a warm child"
    if setting in ("0", "off", "no", "false"):
        return f"{SWITCH}={setting}"
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if any(environ.get(name) for name in ("APPTAINER_CONTAINER", "SINGULARITY_CONTAINER")):
        return "in a container"
    if environ.get("SLURM_JOB_ID"):
        return "a SLURM job"
    if os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0"):
        return "an NVIDIA device is present (a forked process cannot use CUDA)"
    return None


def _package_state(digest) -> None:
    root = os.path.dirname(os.path.abspath(__file__))
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".py", ".json", ".yaml")):
                st = os.stat(os.path.join(folder, name))
                digest.update(
                    f"{os.path.relpath(os.path.join(folder, name), root)}:{st.st_size}:{st.st_mtime_ns}\n".encode()
                )


def server_key(environ=os.environ) -> str:
    """What a server's imports depend on; equal keys may share a server."""
    import site

    digest = hashlib.sha256()
    digest.update(f"{sys.executable}\n{sys.version}\n".encode())
    for name in sorted(environ):
        if name.startswith(KEY_PREFIXES) or name in KEY_NAMES:
            digest.update(f"{name}={environ[name]}\n".encode())
    for folder in [*site.getsitepackages(), site.getusersitepackages()]:
        with contextlib.suppress(OSError):
            digest.update(f"{folder}:{os.stat(folder).st_mtime_ns}\n".encode())
    _package_state(digest)
    return digest.hexdigest()[:20]


def runtime_dir() -> str | None:
    """A folder only this user can enter, for the sockets; None when there is no safe one."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    folder = os.path.join(base, f"ftflow-warm-{os.getuid()}")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        st = os.lstat(folder)
    except OSError:
        return None
    if st.st_uid != os.getuid() or st.st_mode & 0o077 or not os.path.isdir(folder) or os.path.islink(folder):
        return None
    return folder


# --------------------------------------------------------------------------- client


def _connect(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    if uid != os.getuid():
        sock.close()
        return None
    return sock


def _start_server(folder: str, key: str, path: str) -> tuple[socket.socket | None, str | None]:
    """Connect to the key's server, starting it first (one starter at a time) when there is none;
    (None, why) when it could not be started."""
    sock = _connect(path)
    if sock is not None:
        return sock, None
    log_path = os.path.join(folder, f"{key}.log")
    with open(os.path.join(folder, f"{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the others wait here while one server imports
        sock = _connect(path)
        if sock is not None:
            return sock, None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a server that died without cleaning up
        with open(log_path, "ab") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "ftflow.warm_server", path],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                cwd="/",
            )
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline and server.poll() is None:
            sock = _connect(path)
            if sock is not None:
                return sock, None
            time.sleep(0.05)
        if server.poll() is None:
            server.kill()
            return None, f"the warm job server was not ready within {READY_SECONDS:.0f} s"
        return None, f"the warm job server exited with status {server.returncode} (its log: {log_path})"


def send(sock: socket.socket, doc: dict, fds: list[int] | None = None) -> None:
    payload = json.dumps(doc).encode()
    head = HEADER.pack(len(payload))
    if fds:
        socket.send_fds(sock, [head], fds)
    else:
        sock.sendall(head)
    sock.sendall(payload)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(size)
        if not chunk:
            raise ConnectionError("connection closed")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def recv(sock: socket.socket, maxfds: int = 0) -> tuple[dict, list[int]]:
    fds: list[int] = []
    if maxfds:
        head, fds, _, _ = socket.recv_fds(sock, HEADER.size, maxfds)
        if len(head) < HEADER.size:
            head += _recv_exact(sock, HEADER.size - len(head))
    else:
        head = _recv_exact(sock, HEADER.size)
    (size,) = HEADER.unpack(head)
    return json.loads(_recv_exact(sock, size)), fds


FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def usage_line(pid: int, ended: dict) -> str:
    """The job's peak memory and CPU time, for its log: its Snakemake benchmark file measures this client."""
    gib = ended["max_rss_kib"] / 2**20
    return (
        f"ftflow: warm job {pid} used peak RSS {gib:.2f} GiB and {ended['cpu_seconds']:.1f} s of CPU "
        "(the rule's benchmark file measures the client, not the job)"
    )


def run_warm(argv: list[str]) -> int | None:
    """Run `ftflow ARGV` in a child of the warm server; None when it must start cold instead."""
    if why_cold() is not None:
        return None
    folder = runtime_dir()
    if folder is None:
        return None
    key = server_key()
    path = os.path.join(folder, f"{key}.sock")
    sock = None
    try:
        sock, why = _start_server(folder, key, path)
        if sock is None:
            print(f"ftflow: warm start unavailable: {why}; this job starts cold", file=sys.stderr)
            return None
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        umask = os.umask(0o022)
        os.umask(umask)
        request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "umask": umask}
        send(sock, request, [0, 1, 2])
        started, _ = recv(sock)
    except (OSError, ValueError, ConnectionError):
        if sock is not None:
            sock.close()  # a child forked all the same sees its client gone and ends
        return None  # start cold
    child = int(started["pid"])

    def forward(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    try:
        ended, _ = recv(sock)
    except (OSError, ValueError, ConnectionError):
        print("ftflow: error: the warm job server went away during the job", file=sys.stderr)
        return 1
    finally:
        sock.close()
    if ended.get("exit") == 0 and "max_rss_kib" in ended:  # a failed job's error stays its log's last line
        print(usage_line(child, ended), file=sys.stderr, flush=True)
    if "signal" in ended:
        signum = int(ended["signal"])
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # end the way the job ended, so snakemake sees the same
        return 128 + signum
    return int(ended["exit"])
