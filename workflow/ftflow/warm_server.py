"""The warm job server (warm.py says when and why): it imports the job modules once, then
forks a child per request from its single-threaded main loop; the child becomes the job.

Started by the first warm client as `python -m ftflow.warm_server SOCKET`; it
binds SOCKET only once its imports are done, reports each child's exit status
or signal to that child's client, and ends after warm.IDLE_SECONDS without jobs.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import selectors
import signal
import socket
import sys
import threading
import time

from . import warm
from .cli import main
from .optional_imports import hide_bitsandbytes

# What the server imports once: the modules the job steps import at their top.
PRELOAD = ("ftflow.train", "ftflow.evaluation", "ftflow.merge", "ftflow.data", "ftflow.prepare", "ftflow.harness")


def _run_child(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """In the forked child: become the job's process and run its command line; never returns."""
    warm.IN_CHILD = True  # the command line below must not ask for a server again
    code = 1
    try:
        for number, fd in enumerate(fds[:3]):
            os.dup2(fd, number)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(request["cwd"])
        os.umask(int(request["umask"]))
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["ftflow", *request["argv"]]
        os.setsid()

        def watch() -> None:
            # The client holds the other end; when it is gone (killed), the job must not outlive it.
            with contextlib.suppress(OSError):
                while conn.recv(1):
                    pass
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=watch, name="ftflow-warm-client", daemon=True).start()
        code = main(request["argv"])
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # the same traceback a cold process would print
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(code if isinstance(code, int) else 1)


def serve(path: str) -> None:
    """Import the job modules, then fork a child per request until warm.IDLE_SECONDS pass without jobs."""
    os.environ.pop(warm.SWITCH, None)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = f"{path}.{os.getpid()}"
    listener.bind(staging)  # first: a socket that cannot be made fails before seconds of imports
    listener.listen(64)
    try:
        hide_bitsandbytes()
        for name in PRELOAD:
            importlib.import_module(name)
    except BaseException:
        os.unlink(staging)  # the traceback goes to the server's log, which the client names
        raise
    os.rename(staging, path)  # clients connect only once the imports are done
    inode = os.stat(path).st_ino

    woken_r, woken_w = os.pipe()
    os.set_blocking(woken_w, False)
    signal.set_wakeup_fd(woken_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(woken_r, selectors.EVENT_READ, "child")
    children: dict[int, socket.socket] = {}
    idle_since = time.monotonic()
    print(f"ftflow warm server {os.getpid()} ready at {path}", file=sys.stderr, flush=True)

    while children or time.monotonic() - idle_since < warm.IDLE_SECONDS:
        for key, _ in selector.select(timeout=1.0):
            if key.data == "child":
                with contextlib.suppress(BlockingIOError):
                    os.read(woken_r, 512)
            else:
                _accept(listener, selector, children, woken_r, woken_w)
        _reap(children)
        if children:
            idle_since = time.monotonic()
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == inode:
            os.unlink(path)


def _accept(listener, selector, children, woken_r, woken_w) -> None:
    conn, _ = listener.accept()
    try:
        conn.settimeout(10)
        request, fds = warm.recv(conn, maxfds=3)
        conn.settimeout(None)
    except (OSError, ValueError, ConnectionError):
        conn.close()
        return
    pid = os.fork()
    if pid == 0:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        selector.close()
        listener.close()
        for fd in (woken_r, woken_w):
            os.close(fd)
        for other in children.values():
            other.close()
        _run_child(conn, request, fds)
    for fd in fds:
        os.close(fd)
    children[pid] = conn
    try:
        warm.send(conn, {"pid": pid})
    except OSError:
        pass  # the client is gone; its child sees that and ends


def _reap(children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is None:
            continue
        if os.WIFSIGNALED(status):
            ended = {"signal": os.WTERMSIG(status)}
        else:
            ended = {"exit": os.waitstatus_to_exitcode(status)}
        # what the job's Snakemake benchmark file cannot see: it measures the client
        ended.update(max_rss_kib=usage.ru_maxrss, cpu_seconds=round(usage.ru_utime + usage.ru_stime, 2))
        with contextlib.suppress(OSError):
            warm.send(conn, ended)
        conn.close()


if __name__ == "__main__":
    serve(sys.argv[1])
