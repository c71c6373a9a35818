"""The post-training evaluation a training job logs to its MLflow run (no Ray needed).

On up to ``limit`` validation windows (train windows if the validation split is empty), read
exactly as the training workers read them: quantized MSE per bin of the store's (training)
histogram in physical units, logged as ``val_qmse_bin_{j}`` (non-empty bins) and
``val_qmse_top5`` / ``val_qmse_top10``; and five PNG figures under ``figures/``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from cloudburst import storage, tracking
from cloudburst.config import TrainJobConfig
from cloudburst.data.ingest import open_store
from cloudburst.data.loader import WindowDataset
from cloudburst.data.windows import build_index, split_index
from cloudburst.evaluation import figures
from cloudburst.models.losses import quantized_mse

__all__ = ["FIGURES", "evaluation_windows", "log_evaluation", "qmse_metrics"]

FIGURES = (
    "reconstructions",
    "qq_reconstruction",
    "quantized_mse",
    "samples",
    "latent_interpolation",
)


def evaluation_windows(cfg: TrainJobConfig, transform: Any, limit: int = 256) -> dict[str, Any]:
    """Up to ``limit`` windows (model space) of the val split, else train, in index order.

    Returns ``x`` (n, 1, t, y, x) float32, ``mask`` bool alike, ``part`` and ``stats``.
    """
    opts = storage.options_from(cfg.data.store, cfg.storage)
    ds, stats = open_store(cfg.data.store, opts)
    index = build_index(ds, cfg.data.windows)
    part = "val"
    chosen = split_index(index, cfg.data.split, "val")
    if len(chosen) == 0:
        part, chosen = "train", split_index(index, cfg.data.split, "train")
    chosen = chosen.subset(np.arange(min(int(limit), len(chosen))))
    dataset = WindowDataset(
        cfg.data.store,
        chosen,
        storage_options=opts,
        transform=transform,
        shuffle=False,
        cache_blocks=cfg.data.loader.cache_blocks,
        rank=0,
        world_size=1,
    )
    items = list(dataset)
    if not items:
        raise ValueError(f"no {part} windows to evaluate in {cfg.data.store}")
    return {
        "x": torch.stack([it["x"] for it in items]),
        "mask": torch.stack([it["mask"] for it in items]),
        "part": part,
        "stats": stats,
    }


def qmse_metrics(mse: torch.Tensor, counts: torch.Tensor, prefix: str = "val_") -> dict[str, float]:
    """``{prefix}qmse_bin_{j}`` for non-empty bins, plus the mean of the top 5 / 10 of them."""
    nonempty = [j for j in range(counts.numel()) if int(counts[j]) > 0]
    out = {f"{prefix}qmse_bin_{j}": float(mse[j]) for j in nonempty}
    for k in (5, 10):
        top = nonempty[-k:]
        if top:
            out[f"{prefix}qmse_top{k}"] = float(np.mean([float(mse[j]) for j in top]))
    return out


def _physical(packaged: tracking.PrecipitationModel, y: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(packaged.transform.inverse(y.detach().double().cpu())).clamp_min(0.0)


@torch.no_grad()
def log_evaluation(
    cfg: TrainJobConfig,
    packaged: tracking.PrecipitationModel,
    run_id: str,
    *,
    limit: int = 256,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, float]:
    """Compute and log (to ``run_id`` on MLflow's current tracking URI) the evaluation.

    The model runs on CPU. Returns the logged metrics.
    """
    model = packaged.model.cpu().eval()
    data = evaluation_windows(cfg, packaged.transform, limit)
    x, mask, stats = data["x"], data["mask"], data["stats"]
    x_hat = torch.cat([model.reconstruct(b) for b in x.split(batch_size)])
    phys, phys_hat = _physical(packaged, x), _physical(packaged, x_hat)
    edges = torch.tensor(stats.histogram_edges, dtype=torch.float64)
    mse, counts = quantized_mse(phys, phys_hat, edges, mask)
    metrics = qmse_metrics(mse, counts)

    client = MlflowClient()
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    client.set_tag(run_id, "evaluation_split", f"{data['part']} ({x.shape[0]} windows)")

    units = stats.units or packaged.units
    wettest = torch.argsort(phys.flatten(1).sum(1), descending=True)[:4]
    latent = int(model.cfg.latent)
    generator = torch.Generator().manual_seed(int(seed))
    z = torch.randn(2, latent, generator=generator)
    line = figures.latent_line(z[0], z[1], points=5)
    made = {
        "reconstructions": figures.inputs_and_reconstructions(
            phys[wettest], phys_hat[wettest], units, n=4
        ),
        "qq_reconstruction": figures.qq_plot(phys[mask], phys_hat[mask], units),
        "quantized_mse": figures.quantized_mse_per_bin(
            edges, {f"{cfg.vae.loss} ({data['part']})": mse}, counts, units=units
        ),
        "samples": figures.samples_grid(packaged.sample(8, seed=seed), units),
        "latent_interpolation": figures.latent_interpolation(
            _physical(packaged, model.decode(line)), units
        ),
    }
    for name in FIGURES:
        tracking.log_figure(made[name], f"figures/{name}.png", run_id=run_id)
    return metrics
