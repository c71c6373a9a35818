"""Scores in physical units, shared by training (every epoch, ``val_``) and evaluation (the
registered model, ``eval_``).

- :func:`reconstruction_scores` (latent models) and :func:`reconstructor_scores` (any
  deterministic reconstruction, e.g. a VQ-VAE's): quantized MSE per bin of the store's
  histogram, its top 5 / 10 bins, the 0.99 / 0.999 quantiles of inputs and reconstructions
  with their relative errors, the mean bias, the wet fractions (and, for latent models, the
  active latent units);
- :func:`sample_scores` (generative models): samples against reference windows: the relative
  quantile errors, the mean bias, the wet fractions and the spatial power spectrum's error.

Every one of these is in physical units after the data transformation's inverse, so trials of
a sweep whose losses live in different spaces (bins, objectives, input transformations) rank
on the same scale. Degenerate inputs (nothing valid, nothing finite) give NaN, not an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cloudburst.evaluation.spectra import radial_psd
from cloudburst.models.losses import active_units, quantized_mse
from cloudburst.models.roles import LatentModel, Reconstructor

__all__ = [
    "PSD_FLOOR",
    "QUANTILES",
    "Reconstruction",
    "distribution_scores",
    "physical",
    "psd_error",
    "qmse_metrics",
    "reconstruction_scores",
    "reconstructor_scores",
    "score_reconstruction",
    "relative_error",
    "sample_scores",
]

QUANTILES = (0.99, 0.999)
# sample power below this share of the reference's largest power counts as this share
# (a constant sample field would otherwise give log10(0)): caps one wavenumber's error
PSD_FLOOR = 1e-10


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


def relative_error(estimate: float, reference: float) -> float:
    """|estimate - reference| / |reference|; the absolute error where ``reference`` is 0;
    NaN where either is not finite."""
    if not (math.isfinite(estimate) and math.isfinite(reference)):
        return math.nan
    diff = abs(estimate - reference)
    return diff if reference == 0 else diff / abs(reference)


def _quantile(values: torch.Tensor, q: float) -> float:
    """The ``q`` quantile of a flat tensor (as float32, like the historical scores, linear
    interpolation); NaN if empty. numpy, not torch.quantile: that refuses inputs of more than
    2**24 values, and a probe of 512 windows of 10 x 64 x 64 has 21 million."""
    if values.numel() == 0:
        return math.nan
    return float(np.quantile(values.detach().cpu().float().numpy(), q))


def _finite(values: torch.Tensor) -> torch.Tensor:
    flat = values.detach().double().cpu().reshape(-1)
    return flat[torch.isfinite(flat)]


def distribution_scores(
    reference: torch.Tensor, estimate: torch.Tensor, prefix: str = "val_", name: str = "recon"
) -> dict[str, float]:
    """Marginal scores of ``estimate`` values against ``reference`` values, both physical
    (any shape; non-finite values are left out).

    - ``{prefix}q{q}_input`` / ``{prefix}q{q}_{name}``: the quantiles (q in :data:`QUANTILES`);
    - ``{prefix}q{q}_error``: :func:`relative_error` of the estimate's quantile;
    - ``{prefix}mean_bias``: (mean estimate - mean reference) / mean reference, signed (the
      plain difference where the reference mean is 0);
    - ``{prefix}wet_fraction``: the share of estimate values > 0 (no dry threshold applied);
    - ``{prefix}observed_wet_fraction``: the share of reference values > 0.

    An empty side gives NaN for every score that needs it.
    """
    ref, est = _finite(reference), _finite(estimate)
    out: dict[str, float] = {}
    for q in QUANTILES:
        q_ref, q_est = _quantile(ref, q), _quantile(est, q)
        out[f"{prefix}q{q}_input"] = q_ref
        out[f"{prefix}q{q}_{name}"] = q_est
        out[f"{prefix}q{q}_error"] = relative_error(q_est, q_ref)
    mean_ref = float(ref.mean()) if ref.numel() else math.nan
    mean_est = float(est.mean()) if est.numel() else math.nan
    bias = mean_est - mean_ref
    out[f"{prefix}mean_bias"] = bias if mean_ref == 0 else bias / mean_ref
    out[f"{prefix}wet_fraction"] = float((est > 0).double().mean()) if est.numel() else math.nan
    out[f"{prefix}observed_wet_fraction"] = (
        float((ref > 0).double().mean()) if ref.numel() else math.nan
    )
    return out


def psd_error(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Mean over wavenumbers of |log10(P_estimate(k) / P_reference(k))|, P the radially
    averaged spatial power spectrum (:func:`cloudburst.evaluation.spectra.radial_psd`) of
    snapshots ``(..., y, x)`` (NaN pixels are filled with their snapshot's mean).

    Wavenumbers where the reference has no power are left out; estimate power below
    :data:`PSD_FLOOR` times the reference's largest counts as that. NaN where nothing is left.
    """
    ref_arr = np.asarray(reference, dtype=np.float64)
    est_arr = np.asarray(estimate, dtype=np.float64)
    est_arr = np.where(np.isfinite(est_arr), est_arr, np.nan)
    if ref_arr.ndim < 2 or min(ref_arr.shape[-2:]) < 2:
        return math.nan
    try:
        _, p_ref = radial_psd(ref_arr)
        _, p_est = radial_psd(est_arr)
    except ValueError:  # every snapshot of one side is entirely NaN
        return math.nan
    keep = np.isfinite(p_ref) & (p_ref > 0) & np.isfinite(p_est)
    if not keep.any():
        return math.nan
    floor = PSD_FLOOR * float(p_ref[keep].max())
    ratio = np.maximum(p_est[keep], floor) / p_ref[keep]
    return float(np.mean(np.abs(np.log10(ratio))))


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
    """Reconstruct ``x`` (model space) through the posterior mean and score it in physical
    units on the valid pixels.

    Metrics: those of :func:`reconstructor_scores`, and ``{prefix}active_units`` of the
    encoder means. ``model`` runs where its parameters are.
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
    rec = score_reconstruction(x, torch.cat(outs), mask, transform, edges, prefix=prefix)
    mu_all = torch.cat(mus)
    rec.metrics[f"{prefix}active_units"] = float(active_units(mu_all)) if len(mu_all) > 1 else 0.0
    return rec


@torch.no_grad()
def reconstructor_scores(
    model: Reconstructor,
    x: torch.Tensor,
    mask: torch.Tensor,
    transform: Any,
    edges: Any,
    *,
    prefix: str = "val_",
    batch_size: int = 64,
) -> Reconstruction:
    """Reconstruct ``x`` (model space) with ``model.reconstruct`` (a deterministic
    reconstruction, e.g. through a codebook) and score it as :func:`score_reconstruction`.
    ``model`` runs where its parameters are."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outs = [model.reconstruct(chunk.to(device)).float().cpu() for chunk in x.split(batch_size)]
    model.train(was_training)
    return score_reconstruction(x, torch.cat(outs), mask, transform, edges, prefix=prefix)


def score_reconstruction(
    x: torch.Tensor,
    x_hat: torch.Tensor,
    mask: torch.Tensor,
    transform: Any,
    edges: Any,
    *,
    prefix: str = "val_",
) -> Reconstruction:
    """Score reconstructions ``x_hat`` of ``x`` (both (n, 1, time, y, x) model space) in
    physical units on the valid pixels of ``mask``.

    Metrics: quantized MSE per non-empty bin of ``edges`` and its top 5 / 10 bins
    (:func:`qmse_metrics`), ``{prefix}q0.99_input`` / ``{prefix}q0.99_recon`` /
    ``{prefix}q0.99_error`` (and 0.999), ``{prefix}mean_bias``, ``{prefix}wet_fraction``,
    ``{prefix}observed_wet_fraction`` (:func:`distribution_scores`, reconstructions against
    inputs).
    """
    phys, phys_hat = physical(transform, x), physical(transform, x_hat)
    edges_t = torch.as_tensor(np.asarray(edges), dtype=torch.float64)
    mse, counts = quantized_mse(phys, phys_hat, edges_t, mask)
    metrics = qmse_metrics(mse, counts, prefix)
    valid = mask.to(torch.bool)
    metrics.update(distribution_scores(phys[valid], phys_hat[valid], prefix, "recon"))
    return Reconstruction(phys, phys_hat, mse, counts, metrics)


@torch.no_grad()
def sample_scores(
    samples: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor,
    transform: Any,
    *,
    prefix: str = "val_",
) -> dict[str, float]:
    """Samples (n, 1, time, y, x) against windows ``x`` (valid where ``mask``), both in model
    space, scored in physical units (``transform``'s inverse, clipped at 0).

    Metrics: those of :func:`distribution_scores` (the samples' quantiles named
    ``{prefix}q{q}_sample``) on the valid window pixels and the finite sample values, and
    ``{prefix}psd_spatial_error`` (:func:`psd_error` of the samples' time steps against the
    windows', invalid pixels filled with their snapshot's mean).
    """
    phys_gen = physical(transform, samples)
    phys_ref = physical(transform, x)
    valid = mask.to(torch.bool).cpu()
    metrics = distribution_scores(phys_ref[valid], phys_gen, prefix, "sample")
    ref_nan = torch.where(valid, phys_ref, torch.full_like(phys_ref, math.nan))
    metrics[f"{prefix}psd_spatial_error"] = psd_error(ref_nan.numpy(), phys_gen.numpy())
    return metrics
