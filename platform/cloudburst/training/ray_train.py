"""Ray Train: a TorchTrainer over the framework-free steps of ``training.loop``.

Each worker opens the store itself, reads only its shard (``WindowDataset`` shards by world
rank), trains a DDP copy of the model, and reports per-epoch metrics with a checkpoint.
Checkpoints go to ``run.storage_path/run.name``, a local folder or object storage (``s3://``,
``gs://``, through :func:`cloudburst.arrow_fs.ray_storage` with the config's storage options):
on several nodes, object storage, which every node reaches. Ray keeps the index of a run's
checkpoints there too, so re-running with the same name resumes from the latest one whichever
node runs it, and ``FailureConfig`` restarts a failed worker group (on any node) from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from cloudburst import arrow_fs, compat, environment, storage
from cloudburst.config import TrainJobConfig
from cloudburst.data.ingest import StoreStats, open_store, variable_stats
from cloudburst.data.loader import WindowDataset, data_variables, dataset_for, make_loader
from cloudburst.data.transforms import for_data
from cloudburst.data.windows import build_index, split_index
from cloudburst.models import registry
from cloudburst.models.registry import EpochProbe
from cloudburst.training import console
from cloudburst.training.loop import EarlyStopping, LossModule, MeanMetrics, evaluate, train_steps

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"
PROBE_WINDOWS = 512  # validation windows per rank scored in physical units every epoch


def _data(cfg: TrainJobConfig) -> tuple[Any, Any, Any, Any]:
    opts = storage.options_from(cfg.data.store, cfg.storage)
    ds, stats = open_store(cfg.data.store, opts)
    if cfg.data.input is not None:
        stats = variable_stats(cfg.data.store, opts)[cfg.data.input]
    index = build_index(ds, cfg.data.windows, variables=data_variables(cfg.data))
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

    registry.load_plugins(config.get("model_modules", ()))  # the driver's model families
    # this worker's records on its stderr (Ray forwards it to the driver), once: not again
    # through the root logger's handlers, which Ray Train points at the console at INFO for
    # everything else in the process (its per-report lines among them): WARNING unless verbose
    chatty = bool(config.get("verbose"))
    environment.setup_logging(chatty).propagate = False
    logging.getLogger().setLevel(logging.INFO if chatty else logging.WARNING)
    cfg = TrainJobConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(cfg.train.seed + rank)
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    device = ray.train.torch.get_device()

    opts, stats, train_idx, val_idx = _data(cfg)
    if config.get("train_stats"):  # the training split's statistics, from the driver
        stats = StoreStats.from_dict(config["train_stats"])
    transform = for_data(stats, cfg.data.scaling, cfg.data.transform)
    common = {
        "storage_options": opts,
        "transform": transform,
        "cache_blocks": cfg.data.loader.cache_blocks,
        "shuffle_buffer_blocks": cfg.data.loader.shuffle_buffer_blocks,
        "prefetch_requests": cfg.data.loader.prefetch_requests,
    }
    if cfg.data.target is None:
        train_ds = WindowDataset(
            cfg.data.store, train_idx, shuffle=True, seed=cfg.train.seed, **common
        )
        val_ds = WindowDataset(
            cfg.data.store, val_idx if len(val_idx) else train_idx, shuffle=False, **common
        )
    else:  # a pair: input and target, each scaled by its own (training split's) statistics
        by_variable = {
            cfg.data.target: StoreStats.from_dict(config["target_stats"])
            if config.get("target_stats")
            else variable_stats(cfg.data.store, opts)[cfg.data.target],
            str(cfg.data.input): stats,
        }
        pair = {"storage_options": opts}
        train_ds = dataset_for(
            cfg.data, train_idx, by_variable, shuffle=True, seed=cfg.train.seed, **pair
        )
        val_ds = dataset_for(
            cfg.data, val_idx if len(val_idx) else train_idx, by_variable, shuffle=False, **pair
        )

    family = cfg.family
    model = registry.build(family.name, cfg.model, train_idx.shape)
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
    if rank == 0 and config.get("mlflow_run_id"):
        _log_worker_params(config, ctx.get_world_size(), device, mixed)
    probe = None
    if family.epoch_metrics is not None:
        probe_x, probe_mask, probe_target = _probe_windows(val_ds, PROBE_WINDOWS)
        probe = EpochProbe(
            probe_x, probe_mask, transform, stats.histogram_edges, target=probe_target
        )
    with _system_metrics(config if rank == 0 else {}):
        for epoch in range(start_epoch, cfg.train.epochs):
            train_ds.set_epoch(epoch)
            mean = MeanMetrics()
            loader = make_loader(
                train_ds, cfg.data.loader.batch_size, num_workers=cfg.data.loader.num_workers
            )
            bar = console.progress_bar(
                cfg.train.max_steps_per_epoch,
                f"epoch {epoch + 1}/{cfg.train.epochs}",
                enabled=rank == 0 and bool(config.get("progress")),
            )
            started, samples = time.perf_counter(), 0
            for metrics in train_steps(
                step_module,
                loader,
                optimizer,
                device=device,
                mixed_precision=mixed,
                max_steps=cfg.train.max_steps_per_epoch,
            ):
                n = int(metrics.pop("batch_size"))
                mean.update(metrics, n)
                samples += n
                bar.update(1)
            bar.close()
            rate = samples / max(time.perf_counter() - started, 1e-9)
            val = evaluate(
                core,
                itertools.islice(
                    make_loader(val_ds, cfg.data.loader.batch_size), cfg.train.max_val_batches
                ),
                device=device,
                mixed_precision=mixed,
            )
            # every rank sees equal shards: the mean of rank means is the global mean, and
            # every rank takes the same early-stopping decision (none waits in a collective)
            report = world_mean(
                {**mean.compute("train_"), **{f"val_{k}": v for k, v in val.items()}}, device
            )
            report["epoch"] = epoch
            if family.epoch_metrics is not None and probe is not None:
                # the family's own scores on this rank's fixed probe windows
                report.update(family.epoch_metrics(core, dataclasses.replace(probe, epoch=epoch)))
            if rank == 0:
                log.info(console.epoch_line(epoch, cfg.train.epochs, report, family.metrics, rate))
                warning = family.epoch_warning and family.epoch_warning(cfg.model, report)
                if warning:
                    log.warning("epoch %d: %s", epoch + 1, warning)
            stop = stopper.step(report["val_loss"])
            report["best_val_loss"] = stopper.best
            if rank == 0 and config.get("mlflow_run_id"):
                _log_epoch(config["tracking_uri"], config["mlflow_run_id"], report, epoch)
            with tempfile.TemporaryDirectory() as folder:
                ckpt = None
                if rank == 0:
                    _write_checkpoint(folder, core, optimizer, stopper, report, epoch)
                    ckpt = Checkpoint.from_directory(folder)
                ray.train.report(console.reported(report), checkpoint=ckpt)
            if stop:
                break


def _write_checkpoint(
    folder: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    stopper: EarlyStopping,
    report: dict[str, float],
    epoch: int,
) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "early_stopping": stopper.state(),
    }
    torch.save(state, os.path.join(folder, CHECKPOINT_FILE))
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(report, f)


def _log_worker_params(
    config: dict[str, Any], world_size: int, device: torch.device, mixed: bool
) -> None:
    """What the workers actually got (the config only asks): logged once by rank 0."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=config["tracking_uri"])
    run_id = config["mlflow_run_id"]
    client.log_param(run_id, "world_size", world_size)
    client.log_param(run_id, "device", device.type)
    client.log_param(run_id, "precision", "bf16-mixed" if mixed else "fp32")


def _log_epoch(uri: str, run_id: str, report: dict[str, float], epoch: int) -> None:
    """Per-epoch metrics into the driver's MLflow run (rank 0 only), in one request."""
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, epoch) for k, v in report.items() if k != "epoch"]
    MlflowClient(tracking_uri=uri).log_batch(run_id, metrics=metrics)


@contextlib.contextmanager
def _system_metrics(config: dict[str, Any]) -> Iterator[None]:
    """While open, MLflow samples this node's CPU, memory, disk, network and GPU into the
    driver's run (``system/...`` metrics); nothing without a run. Never stops training."""
    run_id, uri = config.get("mlflow_run_id"), config.get("tracking_uri")
    interval = config.get("system_metrics_interval")
    monitor = None
    if run_id and uri and interval:
        try:
            import mlflow
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            mlflow.set_tracking_uri(uri)
            monitor = SystemMetricsMonitor(run_id, sampling_interval=float(interval))
            monitor.start()
        except Exception as exc:  # noqa: BLE001 - monitoring must never stop training
            log.warning("system metrics not logged: %r", exc)
            monitor = None
    try:
        yield
    finally:
        if monitor is not None:
            compat.finish_system_monitor(monitor)


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


def _probe_windows(
    dataset: WindowDataset, limit: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The first ``limit`` windows of this rank's validation shard: scored every epoch
    (with their targets, for a pair)."""
    xs, masks, targets = [], [], []
    for item in dataset:
        if len(xs) >= limit:
            break
        xs.append(item["x"])
        masks.append(item["mask"])
        if "target" in item:
            targets.append(item["target"])
    return torch.stack(xs), torch.stack(masks), torch.stack(targets) if targets else None


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
    train_stats: dict[str, Any] | None = None,
    target_stats: dict[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
) -> Any:
    """The TorchTrainer for ``cfg`` (not started); rank 0 logs epochs to ``mlflow_run_id``.
    ``train_stats``: the statistics the workers scale and bin with (default: the store's);
    ``target_stats``: the target variable's, for a pair (default: the store's);
    ``callbacks``: Ray Train user callbacks (a sweep trial's ``TuneReportCallback``)."""
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    cfg = absolute_paths(cfg)
    storage_path, filesystem = arrow_fs.ray_storage(
        cfg.run.storage_path, storage.options_from(cfg.run.storage_path, cfg.storage)
    )
    return TorchTrainer(
        train_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "model_modules": registry.plugin_modules(),
            "train_stats": train_stats,
            "verbose": environment.verbose(),
            "progress": console.bars_wanted(),
            "target_stats": target_stats,
            "tracking_uri": tracking_uri,
            "mlflow_run_id": mlflow_run_id,
            "system_metrics_interval": cfg.run.system_metrics_interval,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.train.workers,
            use_gpu=use_gpu,
            resources_per_worker=worker_resources(cfg, use_gpu),
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.checkpoints_to_keep,
                checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min",
            ),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=list(callbacks),
            # Ray Train's own records (worker groups, checkpoints, every report as a dict):
            # warnings only on the console, all of it with --verbose
            logging_config=LoggingConfig(log_level="INFO" if environment.verbose() else "WARNING"),
        ),
    )


def worker_resources(cfg: TrainJobConfig, use_gpu: bool) -> dict[str, float]:
    """What one training worker reserves: its CPUs and, on GPUs, ``train.gpus_per_worker``
    (a fraction lets several small models share one GPU; None: a whole GPU)."""
    resources = {"CPU": float(cfg.train.cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = float(cfg.train.gpus_per_worker or 1.0)
    return resources


def load_checkpoint_model(cfg: TrainJobConfig, checkpoint: Any) -> torch.nn.Module:
    """The model stored in a Ray checkpoint, on CPU."""
    with checkpoint.as_directory() as folder:
        state = torch.load(
            os.path.join(folder, CHECKPOINT_FILE), map_location="cpu", weights_only=False
        )
    window = (cfg.data.windows.length, cfg.data.windows.size, cfg.data.windows.size)
    model = registry.build(cfg.model.kind, cfg.model, window)
    model.load_state_dict(state["model"])
    return model.eval()
