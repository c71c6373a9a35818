"""The whole stack on loopback (infra/local/stack.py, ``make stack-up``): the commands it
prints run a tiny ingest, training and ensemble on it, through ``ray job submit`` to its two
Ray nodes, with the data, checkpoints, MLflow artifacts and ensemble in its S3 bucket; then
``down`` leaves none of its processes behind, and ``up`` refuses a second stack meanwhile."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cloudburst import markers, storage

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
STACK = ROOT / "infra" / "local" / "stack.py"
ID_ENV = "CLOUDBURST_STACK_ID"

# tiny: 16 x 16 pixels, 4-step windows of 8 x 8, one epoch of two steps
DATA = ["synthetic.nt=240", "synthetic.ny=16", "synthetic.nx=16"]
WINDOWS = ["data.windows.size=8", "data.windows.length=4", "data.windows.stride=4"]
TRAIN = [
    *WINDOWS,
    "model.widths=[4, 8]",
    "model.latent=4",
    "train.workers=2",  # one on each node: the nodes have one CPU each
    "train.cpus_per_worker=1",
    "train.epochs=1",
    "train.max_steps_per_epoch=2",
    "train.max_val_batches=1",
    "train.dry_threshold_samples=2",
    "run.system_metrics_interval=null",
]
ENSEMBLE = ["--members", "8", "--chunk-members", "4", "--batch-size", "4"]


def stack(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(STACK), *args, "--root", str(root)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def run(command: list[str], *extra: str) -> str:
    """One of the stack's printed commands, with ``extra`` arguments, from the repository."""
    done = subprocess.run([*command, *extra], cwd=ROOT, capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "succeeded" in out, out[-4000:]
    return out


def leftovers(temp_dir: str, stack_id: str) -> list[str]:
    """Processes naming the stack's temp dir or carrying its id in their environment."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in arg for arg in proc.info["cmdline"] or ()):
                found.append(f"{proc.pid}: {' '.join(proc.info['cmdline'])[:200]}")
            elif proc.environ().get(ID_ENV) == stack_id:
                found.append(f"{proc.pid}: {proc.name()} (stack id in its environment)")
        except psutil.Error:
            continue
    return found


def recorded_alive(state: dict) -> list[int]:
    import psutil

    alive = []
    for record in state["processes"]:
        try:
            proc = psutil.Process(record["pid"])
            if abs(proc.create_time() - record["create_time"]) < 0.5:
                alive.append(record["pid"])
        except psutil.NoSuchProcess:
            continue
    return alive


def test_the_stack_runs_its_jobs_and_stops_without_leftovers(tmp_path):
    from mlflow.tracking import MlflowClient

    root = tmp_path / "stack"
    state: dict = {}
    try:
        up = stack(
            root, "up", "--head-cpus", "1", "--worker-cpus", "1",
            "--object-store-memory", "200000000",
        )  # fmt: skip
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((root / "stack.json").read_text())
        address = state["addresses"]
        assert state["status"] == "up"
        assert {r["name"] for r in state["processes"]} == {"s3", "mlflow", "ray-head", "ray-worker"}
        assert all(url.startswith("http://127.0.0.1:") for url in address.values() if "//" in url)
        # what it printed (over several lines) is what it recorded, run here as printed
        printed = " ".join(up.stdout.replace("\\\n", " ").split())
        for command in state["commands"].values():
            assert shlex.join(command) in printed
        assert recorded_alive(state) == [r["pid"] for r in state["processes"]]

        refused = stack(root, "up")
        assert refused.returncode == 1
        assert "is running" in refused.stderr
        assert json.loads((root / "stack.json").read_text())["id"] == state["id"]

        commands = state["commands"]
        run(commands["ingest"], *DATA, *WINDOWS)
        trained = run(commands["train"], *TRAIN)
        assert "model: models:/cloudburst-vae-demo/1" in trained
        run_id = trained.split("\nrun: ")[1].split()[0]
        made = run(commands["ensemble"], *ENSEMBLE)
        ensemble_url = made.split("ensemble: ")[-1].split()[0]

        options = {"key": "testing", "secret": "testing", "endpoint_url": address["s3"]}
        fs, _ = storage.filesystem(state["bucket"], options)
        objects = fs.find("cloudburst")
        assert "cloudburst/demo/precip.zarr/zarr.json" in objects
        assert [p for p in objects if p.startswith("cloudburst/ray/vae-demo/checkpoint_")]
        assert [p for p in objects if p.startswith("cloudburst/mlflow/") and "MLmodel" in p]
        assert ensemble_url == "s3://cloudburst/ensembles/demo.zarr"
        marker = markers.read_marker(ensemble_url, options)
        assert marker is not None
        assert marker["members"] == 8

        client = MlflowClient(tracking_uri=address["mlflow"], registry_uri=address["mlflow"])
        run_info = client.get_run(run_id)
        assert run_info.data.params["world_size"] == "2"  # a training worker on each node
        assert run_info.info.artifact_uri.startswith("mlflow-artifacts:")
        version = client.get_model_version_by_alias("cloudburst-vae-demo", "candidate")
        assert str(version.version) == "1"
    finally:
        down = stack(root, "down")

    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped" in down.stdout
    assert recorded_alive(state) == []
    assert leftovers(state["temp_dir"], state["id"]) == []
    assert not Path(state["temp_dir"]).exists()
    assert not (root / "stack.json").exists()
    again = stack(root, "down")
    assert again.returncode == 0
    assert "nothing to stop" in again.stdout
