"""Reconstruction scores in physical units, shared by training (every epoch, ``val_``) and
evaluation (the registered model, ``eval_``): quantized MSE per bin of the store's histogram,
its top 5 / 10 bins, the 0.99 / 0.999 quantiles of inputs and reconstructions, and the active
latent units of a Gaussian latent model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cloudburst.models.losses import active_units, quantized_mse
from cloudburst.models.roles import LatentModel

__all__ = ["QUANTILES", "Reconstruction", "physical", "qmse_metrics", "reconstruction_scores"]

QUANTILES = (0.99, 0.999)


def qmse_metrics(mse: torch.Tensor, counts: torch.Tensor, prefix: str = "val_") -> dict[str, float]:
    """``{prefix}qmse_bin_{j}`` for non-empty bins, plus the mean of the top 5 / 10 of them."""
    nonempty = [j for j in range(counts.numel()) if int(counts[j]) > 0]
    out = {f"{prefix}qmse_bin_{j}": float(mse[j]) for j in nonempty}
    for k in (5, 10):
        top = nonempty[-k:]
        if top:
            out[f"{prefix}qmse_top{k}"] = float(np.mean([float(mse[j]) for j in top]))
    return out


def physical(transform: Any, y: torch.Tensor) -> torch.Tensor:
    """Model-space values through the data transformation's inverse, clipped at 0 (float64)."""
    return torch.as_tensor(transform.inverse(y.detach().double().cpu())).clamp_min(0.0)


@dataclass
class Reconstruction:
    """Inputs and deterministic reconstructions in physical units, with the scores on them."""

    phys: torch.Tensor
    phys_hat: torch.Tensor
    mse: torch.Tensor
    counts: torch.Tensor
    metrics: dict[str, float]


@torch.no_grad()
def reconstruction_scores(
    model: LatentModel,
    x: torch.Tensor,
    mask: torch.Tensor,
    transform: Any,
    edges: Any,
    *,
    prefix: str = "val_",
    batch_size: int = 64,
) -> Reconstruction:
    """Reconstruct ``x`` (model space) and score it in physical units.

    Metrics: quantized MSE per non-empty bin of ``edges`` and its top 5 / 10 bins
    (:func:`qmse_metrics`), ``{prefix}q0.99_input`` / ``{prefix}q0.99_recon`` (and 0.999),
    and ``{prefix}active_units`` of the encoder means. ``model`` runs where its parameters are.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    mus, outs = [], []
    for chunk in x.split(batch_size):
        mu, _ = model.encode(chunk.to(device))
        mus.append(mu.float().cpu())
        outs.append(model.decode(mu).float().cpu())
    model.train(was_training)
    phys, phys_hat = physical(transform, x), physical(transform, torch.cat(outs))
    edges_t = torch.as_tensor(np.asarray(edges), dtype=torch.float64)
    mse, counts = quantized_mse(phys, phys_hat, edges_t, mask)
    metrics = qmse_metrics(mse, counts, prefix)
    valid = mask.to(torch.bool)
    for q in QUANTILES:
        metrics[f"{prefix}q{q}_input"] = float(torch.quantile(phys[valid].float(), q))
        metrics[f"{prefix}q{q}_recon"] = float(torch.quantile(phys_hat[valid].float(), q))
    mu_all = torch.cat(mus)
    metrics[f"{prefix}active_units"] = float(active_units(mu_all)) if len(mu_all) > 1 else 0.0
    return Reconstruction(phys, phys_hat, mse, counts, metrics)
