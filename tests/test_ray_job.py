"""``ray job submit`` of jobs/train.py to a cluster started with ``ray start --head``.

The user's path to a cluster: the job's working dir is uploaded, its driver runs on the head,
and Ray Train starts two CPU workers there. Real Fraser data from ../shared/data when present,
synthetic otherwise.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from samples import DATA
from servers import ray_head

from cloudburst.config import IngestConfig, SyntheticConfig
from cloudburst.data.ingest import ingest_config
from cloudburst.data.synthetic import write_synthetic

ROOT = Path(__file__).resolve().parents[1]
FRASER = DATA / "fraser_daily_1986_2017.nc"
EXCLUDES = [".venv", "outputs", ".git", "mlruns", ".pytest_cache", ".ruff_cache"]


def store_and_config(tmp_path: Path) -> tuple[str, str, list[str]]:
    """(store, config file, extra overrides): Fraser when the sample is here, else synthetic."""
    store = str(tmp_path / "precip.zarr")
    if FRASER.exists():
        ingest_config(IngestConfig(source=str(FRASER), target=store), progress=False)
        return store, "jobs/configs/vae-fraser.yaml", []
    write_synthetic(SyntheticConfig(nt=240, ny=16, nx=16), store, progress=False)
    return store, "jobs/configs/vae-demo.yaml", ["data.windows.size=8", "data.windows.length=4"]


@pytest.mark.integration
def test_two_workers_through_ray_job_submit(tmp_path):
    from mlflow.tracking import MlflowClient

    store, config, extra = store_and_config(tmp_path)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job = [
        "python", "jobs/train.py", "--config", config, *extra,
        f"data.store={store}",
        "model.widths=[4, 8]", "model.latent=4",
        "train.workers=2", "train.cpus_per_worker=1",
        "train.epochs=2", "train.max_steps_per_epoch=4",
        f"run.storage_path={tmp_path / 'ray'}", f"run.tracking_uri={tracking}",
        "run.name=submitted", "run.registered_model=submitted-vae",
    ]  # fmt: skip
    with ray_head(num_cpus=2) as head:
        result = subprocess.run(
            [
                sys.executable, "-m", "ray.scripts.scripts", "job", "submit",
                "--address", head.address, "--working-dir", ".",
                "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
                "--", *job,
            ],
            cwd=ROOT, env=head.env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "succeeded" in out, out[-4000:]
    assert "model: models:/submitted-vae/1" in out
    run_id = out.split("run: ")[1].split()[0]

    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    run = client.get_run(run_id)
    # two workers really ran (not just asked for), each with its half of the windows
    assert run.data.params["world_size"] == "2"
    assert run.data.params["device"] == "cpu"
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [0, 1]
    assert str(client.get_model_version_by_alias("submitted-vae", "candidate").version) == "1"
    assert list((tmp_path / "ray" / "submitted").glob("checkpoint_*/state.pt"))


def submit(head, *job: str) -> subprocess.CompletedProcess:  # noqa: ANN001
    return subprocess.run(
        [
            sys.executable, "-m", "ray.scripts.scripts", "job", "submit",
            "--address", head.address, "--working-dir", ".",
            "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
            "--", *job,
        ],
        cwd=ROOT, env=head.env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


@pytest.mark.integration
def test_a_sweep_through_ray_job_submit(tmp_path):
    """A 2-trial sweep submitted to the cluster: trials run on it, the best is registered; a
    sweep whose trial cannot fit the cluster is refused before any trial starts."""
    import yaml
    from mlflow.tracking import MlflowClient

    store = str(tmp_path / "precip.zarr")
    write_synthetic(SyntheticConfig(nt=160, ny=16, nx=16), store, progress=False)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = {
        "name": "submitted-sweep",
        "base": "jobs/configs/vae-demo.yaml",
        "overrides": [
            f"data.store={store}",
            "data.windows.size=8",
            "data.windows.length=4",
            "model.widths=[4, 8]",
            "model.latent=4",
            "train.epochs=2",
            "train.max_steps_per_epoch=3",
            "train.max_val_batches=2",
            "train.dry_threshold_samples=2",
            "run.system_metrics_interval=null",
        ],  # fmt: skip
        "space": {"model.bins": {"type": "grid", "values": [25, 50]}},
        "concurrent": 2,
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "run": {
            "storage_path": str(tmp_path / "ray"),
            "tracking_uri": tracking,
            "registered_model": "submitted-sweep-vae",
        },
    }
    good = tmp_path / "sweep.yaml"
    good.write_text(yaml.safe_dump(sweep))
    too_big = tmp_path / "too-big.yaml"
    too_big.write_text(yaml.safe_dump(sweep | {"resources": {"workers": 3}}))
    with ray_head(num_cpus=2) as head:
        refused = submit(head, "python", "jobs/sweep.py", "--config", str(too_big))
        result = submit(head, "python", "jobs/sweep.py", "--config", str(good))
    refusal = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert "one trial needs 3 CPUs" in refusal and "the cluster has 2 CPUs" in refusal, refusal
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in out, out[-4000:]
    assert "model: models:/submitted-sweep-vae/1" in out
    parent = [ln for ln in out.splitlines() if ln.startswith("run: ")][-1].split()[1]
    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    experiment = client.get_run(parent).info.experiment_id
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(children) == 2
    assert {r.data.params["sweep.model.bins"] for r in children} == {"25", "50"}
