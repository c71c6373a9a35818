"""Scoring of registered models against the observed windows.

For every model (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``, pinned to its version):

- reconstruction (Gaussian latent models that reconstruct, the roles
  :class:`~cloudburst.models.roles.LatentModel` and
  :class:`~cloudburst.models.roles.Reconstructor`): quantized MSE per bin of the training
  histogram, QQ of reconstructions, the reconstructions of the wettest extreme windows;
- generation: ``samples`` unconditional windows, generated and summarised batch by batch
  (:class:`~cloudburst.evaluation.observations.FieldSummary`, wet fraction and wet- and
  dry-spell lengths included, wet above the observed summary's ``wet_threshold``);
- conditional ensembles: ``members`` posterior draws per observed window, verified with
  :class:`~cloudburst.evaluation.verify.EnsembleVerifier`; a latent interpolation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from cloudburst import tracking, versions
from cloudburst.evaluation import figures
from cloudburst.evaluation.entries import Entry, generation_metrics, model_label, split_scores
from cloudburst.evaluation.observations import FieldSummary, Observed, run_params, top_windows
from cloudburst.evaluation.request import EvaluationError, EvaluationRequest
from cloudburst.evaluation.verify import EnsembleVerifier
from cloudburst.models.losses import quantized_mse
from cloudburst.models.package import PrecipitationModel
from cloudburst.models.roles import Generative, LatentModel, Reconstructor
from cloudburst.models.scoring import qmse_metrics

__all__ = ["evaluate_model", "model_entry"]


def model_entry(
    uri: str, request: EvaluationRequest, tracking_uri: str | None
) -> tuple[Entry, Any, dict[str, str]]:
    try:
        version_uri, run_id = versions.pin(uri, tracking_uri)
    except tracking.TrackingError as exc:
        raise EvaluationError(str(exc)) from None
    packaged = tracking.load_model(version_uri, tracking_uri=tracking_uri)
    entry = Entry(
        model_label(version_uri),
        "model",
        {"uri": uri, "version_uri": version_uri, "run_id": run_id, "model": packaged.name},
    )
    return entry, packaged, run_params(run_id, tracking_uri)


@torch.no_grad()
def evaluate_model(
    entry: Entry,
    packaged: PrecipitationModel,
    obs: Observed,
    obs_summary: FieldSummary,
    thresholds: dict[str, float],
    request: EvaluationRequest,
    progress: Callable[[str], None],
) -> Any:
    packaged.model.cpu().eval()
    transform = packaged.transform
    stats = packaged.stats or {}
    bs = request.batch_size
    x = obs.x
    if not (packaged.plays(LatentModel) and packaged.plays(Reconstructor)):
        _generate_and_summarise(entry, packaged, obs, obs_summary, thresholds, request, progress)
        return None
    model = packaged.network(LatentModel)
    # reconstruction
    recon = np.concatenate([packaged.reconstruct(x[a : a + bs]) for a in range(0, len(x), bs)])
    edges = torch.as_tensor(stats.get("histogram_edges") or obs.stats.histogram_edges)
    valid = torch.from_numpy(np.isfinite(x))
    mse, counts = quantized_mse(
        torch.from_numpy(np.nan_to_num(x)).double(), torch.from_numpy(recon).double(), edges, valid
    )
    entry.metrics.update(qmse_metrics(mse, counts, prefix=""))
    entry.curves["qmse_per_bin"] = {
        "edges": edges.tolist(),
        "mse": mse.tolist(),
        "counts": counts.tolist(),
    }
    levels = figures.qq_levels(int(np.isfinite(x).sum()))
    finite = x[np.isfinite(x)]
    entry.curves["qq_reconstruction"] = {
        "levels": levels,
        "observed": np.quantile(finite, levels),
        "model": np.quantile(recon[np.isfinite(x)], levels),
    }
    for q in (0.99, 0.999):
        entry.metrics[f"q{q}_recon"] = float(np.quantile(recon[np.isfinite(x)], q))
    progress(f"{entry.label}: reconstruction scored on {len(x)} windows")

    _generate_and_summarise(entry, packaged, obs, obs_summary, thresholds, request, progress)

    # conditional ensembles: posterior draws for every observed window
    verifier = EnsembleVerifier(thresholds, seed=request.seed)
    rng = torch.Generator().manual_seed(request.seed + 1)
    filled = np.nan_to_num(x)
    for a in range(0, len(x), bs):
        chunk = filled[a : a + bs]
        model_space = np.asarray(transform.forward(chunk), dtype=np.float32)
        mu, logvar = model.encode(torch.from_numpy(np.nan_to_num(model_space))[:, None])
        std = torch.exp(0.5 * logvar)
        members = []
        for _ in range(request.members):
            z = mu + std * torch.randn(mu.shape, generator=rng)
            members.append(packaged.to_physical(model.decode(z)))
        ens = np.stack(members).reshape(request.members, -1)
        verifier.update(ens, x[a : a + bs].reshape(1, -1))
    scores = verifier.compute()
    split_scores(entry, scores, prefix="cond_")
    progress(f"{entry.label}: conditional ensembles of {request.members} members verified")

    # the extremes check: the wettest observed windows, their reconstructions
    entry.recon_top = recon[top_windows(x, request.top_n, obs_summary.extreme)]
    z = torch.randn(2, model.latent_size, generator=torch.Generator().manual_seed(request.seed))
    frames = packaged.to_physical(model.decode(figures.latent_line(z[0], z[1], 5)))
    entry.interpolation = frames
    return recon


@torch.no_grad()
def _generate_and_summarise(
    entry: Entry,
    packaged: PrecipitationModel,
    obs: Observed,
    obs_summary: FieldSummary,
    thresholds: dict[str, float],
    request: EvaluationRequest,
    progress: Callable[[str], None],
) -> None:
    """``request.samples`` unconditional windows, generated and summarised batch by batch."""
    summary = FieldSummary(
        obs_summary.edges,
        packaged.window,
        request.top_n,
        obs_summary.extreme,
        wet_threshold=obs_summary.wet_threshold,  # wet as the observed are
    )
    generator = torch.Generator().manual_seed(request.seed)
    network = packaged.network(Generative)
    done = 0
    while done < request.samples:
        n = min(request.batch_size, request.samples - done)
        y = network.sample(n, generator=generator)
        summary.update(packaged.to_physical(y))
        done += n
    entry.summary = summary
    generation_metrics(
        entry,
        obs_summary,
        thresholds.get("q0.99", obs.stats.quantile(0.99)),
        request.low_threshold,
    )
    progress(f"{entry.label}: {request.samples} windows generated and summarised")
