"""The sweep's front on the held-out split: what the selection would have been on unseen data.

Trials are ranked on validation windows, which the selection itself has looked at. When the
sweep ends, :func:`score_holdout` scores the model of every finished trial on the Pareto front
(and the best) on windows of the base config's ``test`` split, through the same family metrics
the trials reported every epoch (:attr:`cloudburst.models.registry.ModelFamily.epoch_metrics`,
in physical units against the store's histogram), renamed ``val_`` -> ``test_``. The scores go
to each trial's child run and, as ``holdout.csv``, to the sweep's parent run.

A base config whose split has no test windows (a single-day store, split ``none``) gets no
holdout table and a warning, not an error: the sweep's own results stand.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from cloudburst import tracking
from cloudburst.config import TrainJobConfig
from cloudburst.data.samples import split_windows
from cloudburst.models.registry import EpochProbe
from cloudburst.models.roles import Trainable

__all__ = ["HOLDOUT_PREFIX", "holdout_metrics", "score_holdout"]

log = logging.getLogger(__name__)

HOLDOUT_PREFIX = "test_"


@torch.no_grad()
def holdout_metrics(
    packaged: Any, cfg: TrainJobConfig, *, part: str = "test", limit: int = 256
) -> dict[str, float]:
    """The family's per-epoch metrics of ``packaged`` (a :class:`PrecipitationModel`) on up to
    ``limit`` windows of split ``part`` of ``cfg``'s store, prefixed ``test_``.

    Raises ValueError when the split has no windows or the family reports no metrics.
    """
    family = packaged.family
    if family.epoch_metrics is None:
        raise ValueError(f"model family {family.name!r} reports no validation metrics")
    data = split_windows(cfg, packaged.transform, limit, part)
    if data["part"] != part:
        raise ValueError(f"no {part} windows in {cfg.data.store}")
    stats = packaged.stats or {}
    edges = stats.get("histogram_edges") or data["stats"].histogram_edges
    probe = EpochProbe(
        data["x"], data["mask"], packaged.transform, torch.tensor(edges, dtype=torch.float64)
    )
    network = packaged.network(Trainable)
    network.cpu().eval()
    metrics = family.epoch_metrics(network, probe)
    return {
        HOLDOUT_PREFIX + k.removeprefix("val_"): float(v)
        for k, v in metrics.items()
        if not k.startswith("val_qmse_bin_")
    }


def score_holdout(
    rows: Sequence[dict[str, Any]],
    trials: Sequence[str],
    cfg: TrainJobConfig,
    *,
    tracking_uri: str,
    limit: int = 256,
) -> list[dict[str, Any]]:
    """Score the finished ones of ``trials`` (ids of ``rows``, the sweep's results) on the
    test split; log each trial's metrics to its child run. Returns one row per scored trial
    (``trial_id``, the ``param:`` columns, its ``val_`` objective columns and the ``test_``
    metrics); empty when the split has no test windows."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    wanted = [r for r in rows if r["trial_id"] in set(trials) and r.get("model_uri")]
    out: list[dict[str, Any]] = []
    for row in wanted:
        packaged = tracking.load_model(str(row["model_uri"]))
        try:
            metrics = holdout_metrics(packaged, cfg, limit=limit)
        except ValueError as exc:
            log.warning("no holdout scores for the sweep: %s", exc)
            return []
        if row.get("run_id"):
            for key, value in metrics.items():
                client.log_metric(str(row["run_id"]), key, value)
        kept = {k: v for k, v in row.items() if k == "trial_id" or k.startswith("param:")}
        out.append(kept | metrics)
        log.info("trial %s on the test split: %s", row["trial_id"], metrics)
    return out
