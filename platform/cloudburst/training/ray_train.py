"""Ray Train: a TorchTrainer over the framework-free steps of ``training.loop``.

Each worker opens the store itself, reads only its shard (``WindowDataset`` shards by world
rank), trains a DDP copy of the model, and reports per-epoch metrics with a checkpoint.
Checkpoints go to ``run.storage_path/run.name``; re-running with the same name resumes from the
latest one, and ``FailureConfig`` restarts a failed worker group from it.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch

from cloudburst import storage
from cloudburst.config import TrainJobConfig
from cloudburst.data.ingest import open_store
from cloudburst.data.loader import WindowDataset, make_loader
from cloudburst.data.transforms import for_data
from cloudburst.data.windows import build_index, split_index
from cloudburst.models import registry
from cloudburst.models.losses import active_units
from cloudburst.training.loop import EarlyStopping, LossModule, MeanMetrics, evaluate, train_steps

CHECKPOINT_FILE = "state.pt"


def _data(cfg: TrainJobConfig) -> tuple[Any, Any, Any, Any]:
    opts = storage.options_from(cfg.data.store, cfg.storage)
    ds, stats = open_store(cfg.data.store, opts)
    index = build_index(ds, cfg.data.windows)
    return (
        opts,
        stats,
        split_index(index, cfg.data.split, "train"),
        split_index(index, cfg.data.split, "val"),
    )


def train_worker(config: dict[str, Any]) -> None:
    """The per-worker loop (runs inside Ray Train)."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    cfg = TrainJobConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(cfg.train.seed + rank)
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    device = ray.train.torch.get_device()

    opts, stats, train_idx, val_idx = _data(cfg)
    transform = for_data(stats, cfg.data.scaling, cfg.data.transform)
    common = {
        "storage_options": opts,
        "transform": transform,
        "cache_blocks": cfg.data.loader.cache_blocks,
        "shuffle_buffer_blocks": cfg.data.loader.shuffle_buffer_blocks,
    }
    train_ds = WindowDataset(cfg.data.store, train_idx, shuffle=True, seed=cfg.train.seed, **common)
    val_ds = WindowDataset(
        cfg.data.store, val_idx if len(val_idx) else train_idx, shuffle=False, **common
    )

    model = registry.build(cfg.model, cfg.vae, train_idx.shape)
    step_module = ray.train.torch.prepare_model(LossModule(model))
    core = model.to(device)
    optimizer = torch.optim.Adam(core.parameters(), lr=cfg.learning_rate(), betas=cfg.train.betas)
    stopper = EarlyStopping(patience=cfg.train.patience)
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(
                os.path.join(folder, CHECKPOINT_FILE), map_location=device, weights_only=False
            )
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        stopper = EarlyStopping(**state["early_stopping"], patience=cfg.train.patience)
        start_epoch = state["epoch"] + 1

    mixed = cfg.train.mixed_precision and device.type == "cuda"
    for epoch in range(start_epoch, cfg.train.epochs):
        train_ds.set_epoch(epoch)
        mean = MeanMetrics()
        loader = make_loader(
            train_ds, cfg.data.loader.batch_size, num_workers=cfg.data.loader.num_workers
        )
        for metrics in train_steps(
            step_module,
            loader,
            optimizer,
            device=device,
            mixed_precision=mixed,
            max_steps=cfg.train.max_steps_per_epoch,
        ):
            mean.update(metrics, int(metrics.pop("batch_size")))
        val = evaluate(
            core,
            make_loader(val_ds, cfg.data.loader.batch_size),
            device=device,
            mixed_precision=mixed,
        )
        # every rank sees equal shards: the mean of rank means is the global mean, and every
        # rank then takes the same early-stopping decision (no rank left waiting in a collective)
        report = world_mean(
            {**mean.compute("train_"), **{f"val_{k}": v for k, v in val.items()}}, device
        )
        report.update({"epoch": epoch, "active_units": _active_units(core, val_ds, device)})
        if rank == 0 and report["active_units"] < max(1, cfg.vae.latent // 10):
            print(
                f"warning: posterior collapse at epoch {epoch}: {report['active_units']} of "
                f"{cfg.vae.latent} latent units active; the code carries almost no information. "
                "Lower vae.reg_weight or raise vae.rec_weight (regulariser "
                f"{cfg.vae.regulariser} = {report.get('val_' + cfg.vae.regulariser, 0.0):.3g}).",
                flush=True,
            )
        stop = stopper.step(report["val_loss"])
        report["best_val_loss"] = stopper.best
        if rank == 0 and config.get("mlflow_run_id"):
            _log_epoch(config["tracking_uri"], config["mlflow_run_id"], report, epoch)
        with tempfile.TemporaryDirectory() as folder:
            ckpt = None
            if rank == 0:
                torch.save(
                    {
                        "model": core.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "epoch": epoch,
                        "early_stopping": stopper.state(),
                    },
                    os.path.join(folder, CHECKPOINT_FILE),
                )
                with open(os.path.join(folder, "metrics.json"), "w") as f:
                    json.dump(report, f)
                ckpt = Checkpoint.from_directory(folder)
            ray.train.report(report, checkpoint=ckpt)
        if stop:
            break


def _log_epoch(uri: str, run_id: str, report: dict[str, float], epoch: int) -> None:
    """Per-epoch metrics into the driver's MLflow run (rank 0 only)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for key, value in report.items():
        if key != "epoch":
            client.log_metric(run_id, key, float(value), step=epoch)


def preflight(cfg: TrainJobConfig) -> dict[str, int]:
    """Everything that can be checked before a worker starts; raises with a clear message."""
    _, _, train_idx, val_idx = _data(cfg)
    if len(train_idx) < cfg.train.workers:
        raise ValueError(
            f"the train split has {len(train_idx)} windows, fewer than the {cfg.train.workers} "
            "workers; use more data, smaller windows or fewer workers"
        )
    storage.check_writable(
        cfg.run.storage_path,
        storage.options_from(cfg.run.storage_path, cfg.storage),
    )
    return {"train_windows": len(train_idx), "val_windows": len(val_idx)}


def world_mean(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean of each metric over the ranks of the process group (identity without one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(metrics)
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    values /= dist.get_world_size()
    return dict(zip(keys, values.tolist(), strict=True))


@torch.no_grad()
def _active_units(
    model: Any, dataset: WindowDataset, device: torch.device, limit: int = 512
) -> int:
    """Latent dims whose posterior mean varies across (up to ``limit``) validation windows."""
    xs = []
    for i, item in enumerate(dataset):
        if i >= limit:
            break
        xs.append(item["x"])
    if len(xs) < 2:
        return 0
    mu, _ = model.encode(torch.stack(xs).to(device))
    return active_units(mu)


def absolute_paths(cfg: TrainJobConfig) -> TrainJobConfig:
    """Local paths made absolute: Ray workers do not share the driver's working directory."""

    def fix(url: str) -> str:
        return (
            url
            if "://" in url and not url.startswith("file://")
            else os.path.abspath(storage.local_path(url))
        )

    out = cfg.model_copy(deep=True)
    out.data.store = fix(cfg.data.store)
    out.run.storage_path = fix(cfg.run.storage_path)
    return out


def make_trainer(
    cfg: TrainJobConfig,
    *,
    use_gpu: bool,
    tracking_uri: str | None = None,
    mlflow_run_id: str | None = None,
) -> Any:
    """The TorchTrainer for ``cfg`` (not started); rank 0 logs epochs to ``mlflow_run_id``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = absolute_paths(cfg)
    return TorchTrainer(
        train_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "tracking_uri": tracking_uri,
            "mlflow_run_id": mlflow_run_id,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.train.workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=cfg.run.storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.checkpoints_to_keep,
                checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min",
            ),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        ),
    )


def load_checkpoint_model(cfg: TrainJobConfig, checkpoint: Any) -> torch.nn.Module:
    """The model stored in a Ray checkpoint, on CPU."""
    with checkpoint.as_directory() as folder:
        state = torch.load(
            os.path.join(folder, CHECKPOINT_FILE), map_location="cpu", weights_only=False
        )
    window = (cfg.data.windows.length, cfg.data.windows.size, cfg.data.windows.size)
    model = registry.build(cfg.model, cfg.vae, window)
    model.load_state_dict(state["model"])
    return model.eval()
