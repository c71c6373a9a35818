"""jobs/train.py end to end on in-process Ray with a local MLflow store, and its pre-flight."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from servers import JOB_ENV, free_port, kill_processes_naming

from cloudburst.config import SyntheticConfig
from cloudburst.data.synthetic import write_synthetic

ROOT = Path(__file__).resolve().parents[1]
ENV = JOB_ENV


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("train") / "s.zarr")
    write_synthetic(SyntheticConfig(nt=240, ny=16, nx=16), path, progress=False)
    return path


def train_args(tmp_path, store, *overrides):
    """The train job on a tiny VAE over ``store``, runs and models under ``tmp_path``."""
    return [
        sys.executable,
        str(ROOT / "jobs" / "train.py"),
        "--config",
        str(ROOT / "jobs" / "configs" / "vae-demo.yaml"),
        f"data.store={store}",
        "data.windows.size=8",
        "data.windows.length=4",
        "data.windows.stride=4",
        "model.widths=[4, 8]",
        "model.latent=4",
        f"run.storage_path={tmp_path / 'ray'}",
        f"run.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "train.max_steps_per_epoch=3",
        *overrides,
    ]


def train(tmp_path, store, *overrides, timeout=400):
    args = train_args(tmp_path, store, *overrides)
    env = {**os.environ, **ENV}
    # from tmp_path: whatever the job writes to a relative default lands there, not in the checkout
    return subprocess.run(
        args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.integration
def test_trains_registers_and_resumes(tmp_path, store):
    first = train(
        tmp_path, store, "train.epochs=1", "run.name=resume-me", "run.system_metrics_interval=0.2"
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert "model: models:/cloudburst-vae-demo/1" in first.stdout
    run_id = first.stdout.split("run: ")[1].split()[0]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = client.get_run(run_id).data.metrics
    # per epoch, from rank 0: reconstruction scores in physical units and system metrics
    epoch_bins = [k for k in logged if k.startswith("val_qmse_bin_")]
    assert epoch_bins and {"val_qmse_top5", "val_q0.99_input", "val_active_units"} <= set(logged)
    assert [m.step for m in client.get_metric_history(run_id, "val_qmse_top5")] == [0]
    assert any(k.startswith("system/cpu_utilization") for k in logged), sorted(logged)
    # and the registered (best) model's evaluation
    assert {"eval_qmse_top5", "eval_qmse_top10"} <= set(logged)

    from cloudburst import tracking

    packaged = tracking.load_model(
        "models:/cloudburst-vae-demo@candidate", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"
    )
    samples = packaged.sample(3, seed=0)
    assert samples.shape == (3, 4, 8, 8) and (samples >= 0).all()
    # the auto dry threshold: chosen on validation windows, logged, tagged and applied
    assert {"dry_threshold", "dry_threshold_observed_wet_fraction"} <= set(logged)
    threshold = logged["dry_threshold"]
    assert packaged.dry_threshold == pytest.approx(threshold)
    registry = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the registry this job wrote to
    tags = (
        MlflowClient(tracking_uri=registry, registry_uri=registry)
        .get_model_version("cloudburst-vae-demo", "1")
        .tags
    )
    assert float(tags["dry_threshold"]) == pytest.approx(threshold, rel=1e-5)
    many = packaged.sample(16, seed=1)
    assert not ((many > 0) & (many < threshold)).any()
    # the model's statistics are its training split's, and say so
    assert packaged.stats["scope"].startswith("train split")
    assert client.get_run(run_id).data.params["stats_scope"] == packaged.stats["scope"][:500]
    assert tags["stats_scope"] == packaged.stats["scope"]

    # the console: one line per epoch with the few metrics that matter; per-bin metrics in
    # MLflow only; Ray Train's own records and every report's dict stay off it
    console = first.stdout + first.stderr
    assert console.count("epoch 1/1: train_loss") == 1
    assert "val_qmse_top5" in console and "samples/s" in console
    assert "qmse_bin" not in console
    assert "Reporting training result" not in console
    assert "Moving model to device" not in console
    # nor Ray's start-up line or MLflow's registration prints (the job says both itself)
    assert "Started a local Ray instance" not in console
    assert "Successfully registered model" not in console
    assert "Created version '1'" not in console
    assert "PreemptionWatcher" not in console

    # the same run name continues from the last checkpoint: epoch 1 only, not 0 again
    second = train(tmp_path, store, "train.epochs=2", "run.name=resume-me", "--verbose")
    assert second.returncode == 0, second.stderr[-3000:]
    # with --verbose the libraries' records are back; each epoch line is still said once
    chatty = second.stdout + second.stderr
    assert "Reporting training result" in chatty
    assert "Started a local Ray instance" in chatty
    assert chatty.count("epoch 2/2: train_loss") == 1
    assert "model: models:/cloudburst-vae-demo/2" in second.stdout
    run2 = second.stdout.split("run: ")[1].split()[0]
    steps = [m.step for m in client.get_metric_history(run2, "val_loss")]
    assert steps == [1]
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [0]


@pytest.mark.integration
def test_a_diffusion_model_trains_registers_and_samples(tmp_path, store):
    result = train(
        tmp_path,
        store,
        "model={kind: diffusion, widths: [8, 16], embedding: 16, steps: 8}",
        "train.epochs=1",
        "train.max_val_batches=2",
        "run.name=diffusion",
        "run.registered_model=cloudburst-diffusion-test",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model: models:/cloudburst-diffusion-test/1" in result.stdout
    run_id = result.stdout.split("run: ")[1].split()[0]
    from mlflow.tracking import MlflowClient

    from cloudburst import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    logged = client.get_run(run_id).data.metrics
    # the v-loss and the learnt transformation's log-Jacobian, no VAE-only scores
    assert {"train_diffusion", "train_log_jacobian", "val_diffusion"} <= set(logged)
    assert not any(k.startswith("val_qmse") for k in logged)
    assert {"eval_q0.99_input", "eval_q0.99_sample"} <= set(logged)
    figures = {a.path for a in client.list_artifacts(run_id, "figures")}
    assert {"figures/transformation.png", "figures/samples.png"} <= figures
    tags = client.get_model_version("cloudburst-diffusion-test", "1").tags
    assert tags["transform"] == "learnt"
    packaged = tracking.load_model("models:/cloudburst-diffusion-test@candidate", tracking_uri=uri)
    samples = packaged.sample(2, seed=0)
    assert samples.shape == (2, 4, 8, 8) and np.isfinite(samples).all() and (samples >= 0).all()


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("model.loss=l1", "model.loss"),
        ("model.bins=1", "model.bins"),
        ("model.kind=vqgan", "unknown model kind"),
        ("data.windows.size=64", "larger than the store"),
        # the tracking check's own probe: it names the server and says it refused
        ("run.tracking_uri=http://127.0.0.1:{port}", "http://127.0.0.1:{port} is unreachable"),
        ("run.storage_path=/proc/cloudburst-not-writable", "cannot write"),
    ],
)
def test_bad_configs_fail_before_any_worker(tmp_path, store, override, words):
    port = free_port()
    result = train(tmp_path, store, override.format(port=port), timeout=300)
    assert result.returncode == 2
    assert words.format(port=port) in result.stderr
    # refused by the validation or the pre-flight: no training line, no Ray, no checkpoint
    assert "train:" not in result.stdout and "model:" not in result.stdout
    assert "RayTrainWorker" not in result.stderr + result.stdout
    assert "Started a local Ray instance" not in result.stderr + result.stdout
    assert not list(tmp_path.rglob("checkpoint_*"))


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())


@pytest.mark.integration
def test_killed_mid_run_resumes_from_the_last_checkpoint(tmp_path, store):
    import signal

    from mlflow.tracking import MlflowClient

    args = train_args(tmp_path, store, "run.name=killed", "train.epochs=30", "train.patience=100")
    # the driver's in-process cluster under a temp dir of its own, so that exactly its
    # processes can be found and killed afterwards (`ray stop` would end every Ray instance)
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    proc = subprocess.Popen(
        args,
        cwd=tmp_path,
        env={**os.environ, **ENV, "RAY_TMPDIR": ray_tmp},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run_dir = tmp_path / "ray" / "killed"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and len(checkpoints(run_dir)) < 2:
            time.sleep(0.5)
        assert checkpoints(run_dir), "no checkpoint within 240 s"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        kill_processes_naming(ray_tmp)  # what of the killed driver's cluster outlived it
        shutil.rmtree(ray_tmp, ignore_errors=True)

    # every checkpoint left behind is whole: it loads
    import torch

    kept = checkpoints(run_dir)
    epochs = [torch.load(c / "state.pt", weights_only=False)["epoch"] for c in kept]
    last = max(epochs)

    again = train(
        tmp_path, store, "run.name=killed", "train.epochs=" + str(last + 2), "train.patience=100"
    )
    assert again.returncode == 0, again.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = again.stdout.split("run: ")[1].split()[0]
    steps = [m.step for m in client.get_metric_history(run_id, "val_loss")]
    # continued from a registered checkpoint (Ray records one once its upload is complete; a
    # directory being written at the kill is not used), not from scratch, up to the end
    assert steps[0] >= 1 and steps == list(range(steps[0], last + 2))
