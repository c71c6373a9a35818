"""Processes of the local stack: free loopback ports, readiness polling, and finding and
stopping exactly the processes a stack started (by recorded pid and start time, descendants,
the stack's id in the environment or its temp dir on the command line). Used by
infra/local/stack.py; nothing here knows which servers a stack runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ID_ENV = "CLOUDBURST_STACK_ID"  # in the environment of every process the stack starts
HOST = "127.0.0.1"
READY_TIMEOUT_S = 180.0  # a Ray node or an MLflow server on a loaded 2-core machine is slow
STOP_GRACE_S = 8.0  # SIGTERM, then SIGKILL after this long
BIND_FAILURES = ("already in use", "errno 98", "failed to bind", "bind failed", "could not bind")


class StackError(RuntimeError):
    """The stack could not be started or read; the message says why."""

    def __init__(self, message: str, port_taken: bool = False) -> None:
        super().__init__(message)
        self.port_taken = port_taken


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports nothing listens on right now."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            sockets.append(s)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def psutil_module() -> Any:
    try:
        import psutil
    except ImportError as exc:  # pragma: no cover - the dev extra has it
        raise StackError("psutil is missing: install the dev extra (make install)") from exc
    return psutil


def live_process(record: dict[str, Any]) -> Any | None:
    """The recorded process if it still runs: same pid and same start time (a pid the
    system gave to another program since is not ours)."""
    psutil = psutil_module()
    try:
        proc = psutil.Process(int(record["pid"]))
        if abs(proc.create_time() - float(record["create_time"])) > 0.5:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, ValueError):
        return None


def alive(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The recorded processes that still run."""
    return [r for r in state.get("processes", []) if live_process(r) is not None]


def log_tail(path: str | Path, chars: int = 3000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def port_taken(paths: list[Path]) -> bool:
    for path in paths:
        with contextlib.suppress(OSError):
            text = path.read_text(errors="replace").lower()
            if any(words in text for words in BIND_FAILURES):
                return True
    return False


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except OSError:
        return False


def listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
        return True
    return False


def wait_until(
    what: str, ready: Callable[[], bool], proc: subprocess.Popen, logs: list[Path]
) -> None:
    """Poll ``ready`` until it holds; fail with the log's tail when the process exits first
    or :data:`READY_TIMEOUT_S` passes."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            why = (
                f"exited with code {proc.returncode}"
                if proc.poll() is not None
                else f"was not ready within {READY_TIMEOUT_S:.0f} s"
            )
            tails = "\n".join(f"--- {p}:\n{log_tail(p)}" for p in logs if p.exists())
            raise StackError(f"{what} {why}; output:\n{tails}", port_taken=port_taken(logs))
        time.sleep(0.5)


def stack_processes(state: dict[str, Any]) -> list[Any]:
    """Every process that belongs to this stack: the recorded ones still running, their
    descendants, and any process carrying the stack's id in its environment or naming its
    temp dir on its command line. Never this process or its ancestors."""
    psutil = psutil_module()
    mine = {os.getpid()}
    with contextlib.suppress(psutil.Error):
        mine.update(p.pid for p in psutil.Process().parents())
    found: dict[int, Any] = {}
    for record in state.get("processes", []):
        proc = live_process(record)
        if proc is None:
            continue
        found[proc.pid] = proc
        with contextlib.suppress(psutil.Error):
            found.update({c.pid: c for c in proc.children(recursive=True)})
    stack_id = state.get("id")
    temp_dir = state.get("temp_dir")
    for proc in psutil.process_iter():
        if proc.pid in found or proc.pid in mine:
            continue
        with contextlib.suppress(psutil.Error):
            cmdline = proc.cmdline()
            if temp_dir and any(temp_dir in arg for arg in cmdline):
                found[proc.pid] = proc
                continue
            if stack_id and proc.environ().get(ID_ENV) == stack_id:
                found[proc.pid] = proc
    return [p for pid, p in found.items() if pid not in mine]


def stop_processes(procs: list[Any]) -> None:
    """SIGTERM to each, SIGKILL to those still running after :data:`STOP_GRACE_S`."""
    psutil = psutil_module()
    for proc in procs:
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            proc.send_signal(signal.SIGTERM)
    _, left = psutil.wait_procs(procs, timeout=STOP_GRACE_S)
    for proc in left:
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            proc.kill()
    _, still = psutil.wait_procs(left, timeout=5)
    if still:
        pids = ", ".join(str(p.pid) for p in still)
        raise StackError(f"processes {pids} of the stack did not end after SIGKILL")
