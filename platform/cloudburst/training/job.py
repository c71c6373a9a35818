"""A whole training job: pre-flight, Ray Train, MLflow run, registration.

``jobs/train.py`` and the demo call :func:`run_training` (through
``cloudburst.evaluation.report.train_and_evaluate``, which adds the post-training evaluation);
a sweep's trial calls :func:`fit`, the same training without the registration. Everything
that can fail on a bad config fails in :func:`check` before a worker starts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cloudburst import storage, tracking
from cloudburst.config import TrainJobConfig
from cloudburst.data.samples import split_stats
from cloudburst.data.transforms import for_data
from cloudburst.environment import verbose
from cloudburst.models.package import PrecipitationModel, TargetField
from cloudburst.models.roles import Generative
from cloudburst.training import ray_train

log = logging.getLogger(__name__)

PREFLIGHT_ERRORS = (ValueError, RuntimeError, storage.StorageError)


def dry_threshold(cfg: TrainJobConfig, packaged: PrecipitationModel) -> float | None:
    """The package's dry threshold from ``train.dry_threshold``: none, a value, or auto (the
    generated wet fraction matched to the observed one on validation windows, falling back
    to training windows; logged to the active run beside the data's detection limit)."""
    import mlflow
    import numpy as np

    from cloudburst.data.samples import split_windows
    from cloudburst.models import dry

    setting = cfg.train.dry_threshold
    if setting == "none" or cfg.data.target is not None:
        return None
    if setting == "auto" and not packaged.plays(Generative):
        log.info("no dry threshold: a %s model does not sample", packaged.name)
        return None
    if not isinstance(setting, str):
        mlflow.log_metric("dry_threshold", float(setting))
        return float(setting)
    data = split_windows(cfg, packaged.transform, limit=256)
    x, mask = data["x"], data["mask"]
    observed = np.asarray(packaged.transform.inverse(x.double().numpy()), dtype=np.float64)
    observed = np.where(mask.numpy(), np.maximum(observed, 0.0), np.nan)
    generated = packaged.sample(cfg.train.dry_threshold_samples, seed=cfg.train.seed)
    chosen = dry.choose(observed, generated)
    mlflow.log_metrics(chosen.metrics())
    mlflow.set_tag("dry_threshold_split", f"{data['part']} ({len(x)} windows)")
    log.info(
        "dry threshold %.4g %s (detection limit %.4g): wet fraction %.3f observed, %.3f "
        "generated before",
        chosen.value,
        packaged.units,
        chosen.detection_limit,
        chosen.observed_wet_fraction,
        chosen.generated_wet_fraction,
    )
    return chosen.value


@dataclass
class TrainingOutcome:
    model_uri: str
    version: str
    run_id: str
    metrics: dict[str, float] = field(default_factory=dict)
    packaged: PrecipitationModel | None = None


def check(cfg: TrainJobConfig) -> tuple[TrainJobConfig, dict[str, int], str]:
    """(config with absolute paths, window counts, tracking URI); raises on a bad config."""
    cfg = ray_train.absolute_paths(cfg)
    sizes = ray_train.preflight(cfg)
    uri = tracking.setup(cfg.run.tracking_uri, cfg.run.experiment)
    return cfg, sizes, uri


def start_local_ray(preferred_port: int = 8265) -> None:
    """A local Ray cluster with its dashboard on 127.0.0.1 (``preferred_port`` if free).

    Ray Train's placement-group cleaner queries the state API behind the dashboard (without
    one it warns every second), and finds it through ``RAY_API_SERVER_ADDRESS``, set here
    while the cluster starts so every worker inherits it (and then taken back here):
    otherwise, with another Ray instance on the machine, it cannot tell which to ask and
    fails with a traceback. Ray Train's preemption watcher (it logs the drains of a cluster's
    nodes, which a cluster on this machine does not have) is off here unless the user set
    ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER``: it prints a core-worker error line at every run.
    """
    import socket

    import ray

    port = preferred_port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    key = "RAY_API_SERVER_ADDRESS"
    before = os.environ.get(key)
    os.environ[key] = f"http://127.0.0.1:{port}"
    try:  # the cluster's processes keep it; this process gets its own value back
        ray.init(
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            logging_level=ray_logging_level(),
        )
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def ray_logging_level() -> int:
    """The level ``ray.init`` gives Ray's driver logger (it would set INFO again, and its
    start-up lines with it): WARNING, or INFO when the run is verbose."""
    return logging.INFO if verbose() else logging.WARNING


def ensure_ray() -> None:
    """Connect to ``RAY_ADDRESS`` if set, else start a local cluster (no-op when connected)."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, logging_level=ray_logging_level())
        else:
            start_local_ray()


@dataclass
class Fitted:
    """A trained, packaged model and the metrics of the epoch whose checkpoint it holds."""

    packaged: PrecipitationModel
    metrics: dict[str, float]


def fit(
    cfg: TrainJobConfig,
    sizes: dict[str, int],
    uri: str,
    *,
    run_id: str,
    callbacks: Sequence[Any] = (),
) -> Fitted:
    """Train ``cfg`` (already through :func:`check`) inside the active MLflow run ``run_id``
    and package its best checkpoint with its dry threshold; nothing is registered.

    ``callbacks``: Ray Train user callbacks of the trainer (a sweep's trial passes Tune's)."""
    import mlflow
    import ray

    use_gpu = cfg.train.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= cfg.train.workers * (
            cfg.train.gpus_per_worker or 1.0
        )
    tracking.log_config(cfg)
    mlflow.log_params(
        {
            "train_windows": sizes["train_windows"],
            "val_windows": sizes["val_windows"],
            "use_gpu": use_gpu,
        }
    )
    # the model never sees the test years' (or frames') statistics
    stats, scope = split_stats(cfg, variable=cfg.data.input)
    mlflow.log_params({"stats_scope": scope[:500], "stats_max": stats.max})
    log.info("statistics of the %s", scope)
    target, target_stats = None, None
    if cfg.data.target is not None:
        target_stats, _ = split_stats(cfg, variable=cfg.data.target)
        target = TargetField(
            cfg.data.target,
            for_data(target_stats, cfg.data.scaling, cfg.data.transform),
            {**target_stats.to_dict(), "scope": scope},
        )
    trainer = ray_train.make_trainer(
        cfg,
        use_gpu=use_gpu,
        tracking_uri=uri,
        mlflow_run_id=run_id,
        train_stats=stats.to_dict(),
        target_stats=None if target_stats is None else target_stats.to_dict(),
        callbacks=callbacks,
    )
    result = trainer.fit()
    best = min(result.best_checkpoints, key=lambda cm: cm[1]["val_loss"], default=None)
    checkpoint = best[0] if best else result.checkpoint
    metrics = dict(best[1]) if best else dict(result.metrics or {})
    model = ray_train.load_checkpoint_model(cfg, checkpoint)
    window = (cfg.data.windows.length, cfg.data.windows.size, cfg.data.windows.size)
    packaged = PrecipitationModel(
        model,
        cfg.model.kind,
        cfg.model,
        window,
        for_data(stats, cfg.data.scaling, cfg.data.transform),
        {**stats.to_dict(), "scope": scope},
        input_variable=cfg.data.input,
        target=target,
    )
    packaged.dry_threshold = dry_threshold(cfg, packaged)
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    return Fitted(packaged, numeric)


def run_training(cfg: TrainJobConfig, sizes: dict[str, int], uri: str) -> TrainingOutcome:
    """Train ``cfg`` (already through :func:`check`) and register the best checkpoint.

    The outcome carries the packaged model; its run has ended (log more to ``run_id``).
    """
    import mlflow

    ensure_ray()
    with mlflow.start_run(run_name=cfg.run.name) as run:
        fitted = fit(cfg, sizes, uri, run_id=run.info.run_id)
        version, model_uri = tracking.log_and_register(
            fitted.packaged,
            name=cfg.run.registered_model,
            run_id=run.info.run_id,
            tags={"dataset": cfg.data.store},
            experiment=cfg.run.experiment,
        )
    return TrainingOutcome(model_uri, str(version), run.info.run_id, packaged=fitted.packaged)
