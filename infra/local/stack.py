"""The whole Cloudburst stack on this machine's loopback, for a workstation.

    python infra/local/stack.py up       # make stack-up
    python infra/local/stack.py status
    python infra/local/stack.py down     # make stack-down

``up`` starts, each in a process group of its own and on free loopback ports:

- an S3-compatible server (``moto_server``, from the dev extra) holding the bucket
  ``cloudburst`` (in memory: its objects last as long as the stack);
- an MLflow tracking server: SQLite store under the state folder, artifacts proxied
  (``--serve-artifacts``) into ``s3://cloudburst/mlflow``;
- a Ray head (``ray start --head --block``) and one more Ray node (infra/local/ray_node.py:
  what ``ray start --address --block`` does, on loopback only), each with a temp dir of its
  own below one short folder in /tmp (Ray's Unix sockets live there and their paths are
  limited to 107 bytes). Every server listens on 127.0.0.1 only.

It records every process it started (pid, process group, start time), the ports and the
addresses in ``ROOT/stack.json`` (ROOT: ``--root``, else ``CLOUDBURST_STACK_ROOT``, else
``outputs/stack``), writes ``ROOT/serve.yaml`` (jobs/configs/serve.yaml pointed at the stack)
and prints the addresses and the exact commands that run the jobs against it (the jobs' own
configs in jobs/configs/, with the stack's places given as ``key=value`` overrides). It
refuses to start while a stack recorded under ROOT is alive.

``down`` stops exactly what ``up`` started and nothing else: the recorded processes, their
descendants and any process that carries this stack's id in its environment or names its
temp dir on its command line (Ray's node daemons and workers, the jobs' drivers). It never
runs ``ray stop``, which would end every Ray instance on the machine. Running it again, or
with no stack recorded, does nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "platform") not in sys.path:  # also from a checkout without an install
    sys.path.insert(0, str(REPO / "platform"))

from processes import (  # noqa: E402  (infra/local is the script's folder)
    HOST,
    ID_ENV,
    StackError,
    alive,
    answers,
    free_ports,
    listening,
    live_process,
    psutil_module,
    stack_processes,
    stop_processes,
    wait_until,
)

from cloudburst import environment  # noqa: E402

ROOT_ENV = "CLOUDBURST_STACK_ROOT"
DEFAULT_ROOT = REPO / "outputs" / "stack"
STATE_NAME = "stack.json"
BUCKET = "cloudburst"
# the moto server's throw-away credentials; it accepts any
S3_KEY = "testing"
S3_SECRET = "testing"

START_ATTEMPTS = 3  # a free-picked port taken by another program before its server bound it

HEAD_PORTS = (
    "port",
    "dashboard-port",
    "ray-client-server-port",
    "node-manager-port",
    "object-manager-port",
    "metrics-export-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
)
WORKER_PORTS = (
    "node-manager-port",
    "object-manager-port",
    "metrics-export-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
)

# what `ray job submit --working-dir .` leaves out of the upload (capped at 100 MB)
UPLOAD_EXCLUDES = [
    ".venv",
    ".git",
    "outputs",
    "mlruns",
    ".pytest_cache",
    ".ruff_cache",
    "**/__pycache__",
    "tests",
    "benchmarks",
    "helm",
    "infra",
]

# the jobs' own configs; the stack's places are given as overrides
INGEST_CONFIG = "jobs/configs/demo.yaml"
TRAIN_CONFIG = "jobs/configs/vae-demo.yaml"
SERVE_CONFIG = "jobs/configs/serve.yaml"


# ------------------------------------------------------------------------------- places


def stack_root(given: str | None) -> Path:
    """The state folder: ``--root``, else ``$CLOUDBURST_STACK_ROOT``, else outputs/stack."""
    return Path(given or os.environ.get(ROOT_ENV) or DEFAULT_ROOT).resolve()


def state_path(root: Path) -> Path:
    return root / STATE_NAME


def read_state(root: Path) -> dict[str, Any] | None:
    path = state_path(root)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StackError(f"cannot read {path}: {exc}; remove it once nothing of it runs") from exc


def write_state(root: Path, state: dict[str, Any]) -> None:
    """Atomically: a reader sees the previous state or this one."""
    path = state_path(root)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, path)


def shown(path: str | Path) -> str:
    """A path as the printed commands spell it: relative to the repository when inside it
    (the commands run from there), else absolute."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(REPO))
    except ValueError:
        return str(p)


# ---------------------------------------------------------------------------- processes


def spawn(
    root: Path, state: dict[str, Any], name: str, cmd: list[str], env: dict[str, str]
) -> subprocess.Popen:
    """Start ``cmd`` detached, in a new session (its own process group), output to
    ``ROOT/logs/NAME.log``, and record it in the state file at once."""
    log = root / "logs" / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=root,
            start_new_session=True,
        )
    create_time = time.time()
    with contextlib.suppress(Exception):
        create_time = psutil_module().Process(proc.pid).create_time()
    state["processes"].append(
        {
            "name": name,
            "pid": proc.pid,
            "pgid": proc.pid,  # the leader of its new session and group
            "create_time": create_time,
            "cmd": cmd,
            "log": str(log),
        }
    )
    write_state(root, state)
    return proc


def teardown(root: Path, state: dict[str, Any]) -> int:
    """Stop every process of ``state``, remove its temp dir and its state file; returns how
    many processes were stopped."""
    stopped: set[int] = set()
    for _ in range(3):  # a process started while the others stopped is caught next round
        procs = stack_processes(state)
        if not procs:
            break
        # the recorded groups first (all their members at once), then each one found
        for record in state.get("processes", []):
            if live_process(record) is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(record["pgid"]), signal.SIGTERM)
        stop_processes(procs)
        stopped.update(p.pid for p in procs)
    left = stack_processes(state)
    if left:
        pids = ", ".join(str(p.pid) for p in left)
        raise StackError(f"processes {pids} of the stack keep appearing; state kept")
    temp_dir = state.get("temp_dir")
    if temp_dir and Path(temp_dir).name.startswith("cbs-"):
        shutil.rmtree(temp_dir, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        state_path(root).unlink()
    return len(stopped)


# ------------------------------------------------------------------------------ the stack


def base_env(stack_id: str) -> dict[str, str]:
    """The environment of every process of the stack: the user's, completed with Cloudburst's
    defaults for a stack on loopback (environment.py: all scopes; the user's values win)."""
    env = dict(os.environ)
    for name, value in environment.defaults().items():
        env.setdefault(name, value)
    env[ID_ENV] = stack_id
    return env


def s3_env(endpoint: str) -> dict[str, str]:
    """How a process reaches the stack's bucket (cloudburst.storage, boto3, MLflow)."""
    return {
        "CLOUDBURST_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def make_bucket(endpoint: str, name: str) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
        region_name="us-east-1",
    )
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=name)


def ray_nodes(dashboard: str) -> int:
    """How many alive nodes the cluster's state API lists (0 when it does not answer)."""
    try:
        with urllib.request.urlopen(f"{dashboard}/api/v0/nodes?limit=100", timeout=5) as resp:
            body = json.loads(resp.read())
    except (OSError, ValueError):
        return 0
    nodes = body.get("data", {}).get("result", {}).get("result", [])
    return sum(1 for n in nodes if n.get("state") == "ALIVE")


def start(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Start every server, wait until each answers, record it all; returns the state."""
    bindir = Path(sys.executable).parent
    stack_id = uuid.uuid4().hex[:12]
    # short: the nodes' Unix sockets live below it (paths of at most 107 bytes)
    temp_dir = tempfile.mkdtemp(prefix="cbs-", dir="/tmp")
    names = ["s3", "mlflow", "serve"] + [f"head.{p}" for p in HEAD_PORTS]
    names += [f"worker.{p}" for p in WORKER_PORTS]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    s3 = f"http://{HOST}:{ports['s3']}"
    mlflow = f"http://{HOST}:{ports['mlflow']}"
    dashboard = f"http://{HOST}:{ports['head.dashboard-port']}"
    gcs = f"{HOST}:{ports['head.port']}"
    state: dict[str, Any] = {
        "id": stack_id,
        "status": "starting",
        "root": str(root),
        "temp_dir": temp_dir,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "bucket": f"s3://{BUCKET}",
        "ports": ports,
        "addresses": {
            "s3": s3,
            "mlflow": mlflow,
            "dashboard": dashboard,
            "gcs": gcs,
            "serve": f"http://{HOST}:{ports['serve']}",
        },
        "nodes": {"head_cpus": args.head_cpus, "worker_cpus": args.worker_cpus},
        "processes": [],
    }
    write_state(root, state)
    env = base_env(stack_id)
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    logs = root / "logs"

    # the S3 server first: the bucket must exist before MLflow writes into it
    moto = bindir / "moto_server"
    if not moto.exists():
        raise StackError(f"no moto_server next to {sys.executable}: install the dev extra")
    s3_proc = spawn(root, state, "s3", [str(moto), "-H", HOST, "-p", str(ports["s3"])], env)

    # the Ray head meanwhile; the jobs' drivers run the `python` first on its PATH
    ray_bin = str(bindir / "ray")
    ray_env = {
        **env,
        "PATH": f"{bindir}{os.pathsep}{env.get('PATH', '')}",
        # every server on 127.0.0.1 only (1 would bind them to every interface), no token
        # auth (loopback only; the printed commands say RAY_AUTH_MODE=disabled too)
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        # Ray's own files stay in the stack's temp dir, none in /tmp/ray
        "RAY_TMPDIR": temp_dir,
        # Ray Train's placement-group cleaner asks this state API, not another instance's
        "RAY_API_SERVER_ADDRESS": dashboard,
    }
    common = [
        "--block",
        f"--node-ip-address={HOST}",
        f"--object-store-memory={args.object_store_memory}",
        "--disable-usage-stats",
    ]
    head_cmd = [
        ray_bin, "start", "--head", *common,
        f"--num-cpus={args.head_cpus}",
        f"--dashboard-host={HOST}",
        f"--temp-dir={temp_dir}/head",
        *(f"--{p}={ports[f'head.{p}']}" for p in HEAD_PORTS),
    ]  # fmt: skip
    head = spawn(root, state, "ray-head", head_cmd, ray_env)

    wait_until("moto_server", lambda: answers(f"{s3}/moto-api/"), s3_proc, [logs / "s3.log"])
    make_bucket(s3, BUCKET)

    mlflow_env = {
        **env,
        **s3_env(s3),
        "MLFLOW_S3_ENDPOINT_URL": s3,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    mlflow_cmd = [
        str(bindir / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", f"s3://{BUCKET}/mlflow",
        "--serve-artifacts",
        "--host", HOST,
        "--port", str(ports["mlflow"]),
        "--workers", "1",
    ]  # fmt: skip
    mlflow_proc = spawn(root, state, "mlflow", mlflow_cmd, mlflow_env)

    head_logs = [logs / "ray-head.log", *Path(temp_dir, "head").glob("session_latest/logs/*")]
    agent = ports["head.dashboard-agent-listen-port"]
    wait_until("the Ray head's agent", lambda: listening(agent), head, head_logs)
    wait_until("the Ray dashboard", lambda: answers(f"{dashboard}/api/version"), head, head_logs)

    # the second node: `ray start --address` cannot join on loopback only (ray_node.py)
    worker_cmd = [
        sys.executable, str(REPO / "infra" / "local" / "ray_node.py"),
        f"--address={gcs}",
        f"--num-cpus={args.worker_cpus}",
        f"--object-store-memory={args.object_store_memory}",
        f"--temp-dir={temp_dir}/worker",
        *(f"--{p}={ports[f'worker.{p}']}" for p in WORKER_PORTS),
    ]  # fmt: skip
    worker = spawn(root, state, "ray-worker", worker_cmd, ray_env)
    worker_logs = [logs / "ray-worker.log"]
    wait_until("the Ray worker node", lambda: ray_nodes(dashboard) >= 2, worker, worker_logs)
    worker_agent = ports["worker.dashboard-agent-listen-port"]
    wait_until("the worker's agent", lambda: listening(worker_agent), worker, worker_logs)

    wait_until(
        "the MLflow server",
        lambda: answers(f"{mlflow}/health"),
        mlflow_proc,
        [logs / "mlflow.log"],
    )
    state["serve_config"] = str(write_serve_config(root, state))
    state["commands"] = commands(state)
    state["status"] = "up"
    write_state(root, state)
    return state


# ------------------------------------------------------------------------ what to run on it


def job_env(state: dict[str, Any]) -> dict[str, str]:
    """What the jobs need to reach the stack, passed in their runtime environment."""
    return {"MLFLOW_TRACKING_URI": state["addresses"]["mlflow"], **s3_env(state["addresses"]["s3"])}


def submit(state: dict[str, Any], *entrypoint: str) -> list[str]:
    """``ray job submit`` of ``entrypoint`` to the stack, from the repository root."""
    bindir = Path(sys.executable).parent
    runtime_env = {"env_vars": job_env(state), "excludes": UPLOAD_EXCLUDES}
    return [
        "env", "RAY_AUTH_MODE=disabled",  # a token in ~/.ray would switch token auth on
        shown(bindir / "ray"), "job", "submit",
        "--address", state["addresses"]["dashboard"],
        "--working-dir", ".",
        "--runtime-env-json", json.dumps(runtime_env, separators=(",", ":")),
        "--", *entrypoint,
    ]  # fmt: skip


def registered_model() -> str:
    """The name TRAIN_CONFIG registers its model under (``run.registered_model``)."""
    import yaml

    return str(yaml.safe_load((REPO / TRAIN_CONFIG).read_text())["run"]["registered_model"])


def commands(state: dict[str, Any]) -> dict[str, list[str]]:
    """The commands printed by ``up`` (run from the repository root), as argument lists."""
    bucket = state["bucket"]
    store = f"{bucket}/demo/precip.zarr"
    bindir = Path(sys.executable).parent
    return {
        "ingest": submit(
            state, "python", "jobs/ingest.py", "--config", INGEST_CONFIG,
            f"ingest.target={store}",
        ),
        "train": submit(
            state, "python", "jobs/train.py", "--config", TRAIN_CONFIG,
            f"data.store={store}", f"run.storage_path={bucket}/ray",
        ),
        "ensemble": submit(
            state, "python", "jobs/ensemble.py",
            "--model", f"models:/{registered_model()}@candidate",
            "--members", "256", "--seed", "1",
            "--output", f"{bucket}/ensembles/demo.zarr",
        ),
        "endpoint": [
            "env", "RAY_AUTH_MODE=disabled",
            shown(bindir / "serve"), "deploy", shown(state["serve_config"]),
            "--address", state["addresses"]["dashboard"],
        ],
    }  # fmt: skip


def write_serve_config(root: Path, state: dict[str, Any]) -> Path:
    """jobs/configs/serve.yaml with the stack's places: HTTP on the stack's Serve port (one
    proxy, on the head: both nodes share this host), job state and outputs in the bucket,
    the stack's MLflow, and the jobs' environment."""
    import yaml

    config = yaml.safe_load((REPO / SERVE_CONFIG).read_text())
    config["proxy_location"] = "HeadOnly"
    config["http_options"] = {"host": HOST, "port": state["ports"]["serve"]}
    bucket = state["bucket"]
    for app in config["applications"]:
        app["args"].update(
            state_url=f"{bucket}/serve/state",
            allowed_prefixes=[f"{bucket}/ensembles/"],
            data_prefixes=[f"{bucket}/"],
            tracking_uri=state["addresses"]["mlflow"],
        )
        app["runtime_env"] = {"env_vars": job_env(state)}
    path = root / "serve.yaml"
    header = f"# {SERVE_CONFIG} pointed at the local stack (written by infra/local/stack.py up)\n"
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return path


BREAK_BEFORE = {"--address", "--working-dir", "--runtime-env-json", "--"}


def format_command(argv: list[str]) -> str:
    """``argv`` quoted for a POSIX shell, a new line (backslash continuation) before each
    of :data:`BREAK_BEFORE`."""
    out = shlex.quote(argv[0])
    for word in argv[1:]:
        out += (" \\\n    " if word in BREAK_BEFORE else " ") + shlex.quote(word)
    return out


def describe(state: dict[str, Any]) -> str:
    a = state["addresses"]
    cmds = state.get("commands") or commands(state)
    nodes = state["nodes"]
    lines = [
        f"Cloudburst stack up (state: {shown(state_path(Path(state['root'])))})",
        f"  Ray dashboard  {a['dashboard']}   (jobs; GCS {a['gcs']})",
        f"  Ray nodes      head {nodes['head_cpus']} CPUs + worker {nodes['worker_cpus']} CPUs",
        f"  MLflow         {a['mlflow']}   (artifacts in {state['bucket']}/mlflow)",
        f"  S3 (moto)      {a['s3']}   (bucket {state['bucket']}; key and secret: testing)",
        "",
        "From the repository root:",
        "",
        "# 1. ingest the synthetic demo dataset into the bucket",
        format_command(cmds["ingest"]),
        "",
        f"# 2. train on it (registers {registered_model()}, alias candidate)",
        format_command(cmds["train"]),
        "",
        "# 3. an ensemble of the registered model into the bucket",
        format_command(cmds["ensemble"]),
        "",
        f"# the ensemble endpoint (Ray Serve on {a['serve']})",
        format_command(cmds["endpoint"]),
        f"curl -s -X POST {a['serve']}/v1/ensembles -H 'Content-Type: application/json' "
        f'-d \'{{"model": "models:/{registered_model()}@candidate", "members": 64, '
        f'"seed": 1, "output": "{state["bucket"]}/ensembles/api.zarr"}}\'',
        "",
        f"# the registry from here: MLFLOW_TRACKING_URI={a['mlflow']} "
        f"{shown(Path(sys.executable).parent / 'cloudburst')} models list",
        "# stop it all: make stack-down",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ commands


def cmd_up(root: Path, args: argparse.Namespace) -> int:
    state = read_state(root)
    if state is not None:
        running = alive(state)
        if running:
            names = ", ".join(f"{r['name']} (pid {r['pid']})" for r in running)
            print(
                f"stack: error: a stack recorded in {state_path(root)} is running ({names}); "
                "stop it first: make stack-down",
                file=sys.stderr,
            )
            return 1
        teardown(root, state)  # a stale record: whatever is left of it goes
    (root / "logs").mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (root / "mlflow.db").unlink()  # the registry of a stack whose bucket is gone
    for attempt in range(START_ATTEMPTS):
        try:
            state = start(root, args)
            break
        except BaseException as exc:  # failed or interrupted: nothing is left running
            partial = read_state(root)
            if partial is not None:
                teardown(root, partial)
            if isinstance(exc, StackError) and exc.port_taken and attempt + 1 < START_ATTEMPTS:
                print("stack: a port was taken meanwhile; starting again on fresh ports")
                continue
            if isinstance(exc, StackError):
                print(f"stack: error: {exc}", file=sys.stderr)
                return 1
            raise
    print(describe(state))
    return 0


def cmd_down(root: Path, args: argparse.Namespace) -> int:
    state = read_state(root)
    if state is None:
        print(f"stack: none recorded in {state_path(root)}; nothing to stop")
        return 0
    count = teardown(root, state)
    print(f"stack: stopped {count} processes of the stack recorded in {state_path(root)}")
    return 0


def cmd_status(root: Path, args: argparse.Namespace) -> int:
    state = read_state(root)
    if state is None:
        print(f"stack: none recorded in {state_path(root)}")
        return 1
    running = {r["pid"] for r in alive(state)}
    for record in state.get("processes", []):
        word = "running" if record["pid"] in running else "gone"
        print(f"  {record['name']:<11} pid {record['pid']:<8} {word}   log {record['log']}")
    if state.get("status") == "up" and len(running) == len(state.get("processes", [])):
        print(describe(state))
        return 0
    print("stack: not (all) running; make stack-down clears it")
    return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["up", "down", "status"])
    p.add_argument(
        "--root", help=f"state folder (default: ${ROOT_ENV}, else {shown(DEFAULT_ROOT)})"
    )
    p.add_argument("--head-cpus", type=int, default=2, help="CPUs of the Ray head (default 2)")
    p.add_argument(
        "--worker-cpus", type=int, default=2, help="CPUs of the Ray worker node (default 2)"
    )
    p.add_argument(
        "--object-store-memory",
        type=int,
        default=1_000_000_000,
        help="bytes of each Ray node's object store (default 1 GB; Ray's own: 30%% of RAM)",
    )
    args = p.parse_args(argv)
    root = stack_root(args.root)
    try:
        return {"up": cmd_up, "down": cmd_down, "status": cmd_status}[args.command](root, args)
    except StackError as exc:
        print(f"stack: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
