"""The post-training evaluation a training job logs to its MLflow run (no Ray needed).

On up to ``limit`` windows of a split (validation by default; train windows if it is empty),
read exactly as the training workers read them: quantized MSE per bin of the store's histogram
in physical units, logged as ``{prefix}qmse_bin_{j}`` (non-empty bins) and
``{prefix}qmse_top5`` / ``{prefix}qmse_top10``, the 0.99 / 0.999 quantiles of inputs and
reconstructions and the active latent units; and five PNG figures under ``figures/``.

The same :func:`~cloudburst.models.scoring.reconstruction_scores` runs on every epoch inside
the training workers (prefix ``val_``) and on the registered model at the end (prefix
``eval_``). Models that are not Gaussian latent models get the generative evaluation: samples
against the windows (quantiles, intensity histograms) and, where the network transforms its
input itself, the transformation's curve.

:func:`train_and_evaluate` is the training job as users run it: train, register, evaluate.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from cloudburst import tracking
from cloudburst.config import TrainJobConfig
from cloudburst.data.samples import split_windows
from cloudburst.evaluation import figures
from cloudburst.models.package import PrecipitationModel
from cloudburst.models.roles import LatentModel, TransformedInput
from cloudburst.models.scoring import QUANTILES, physical, reconstruction_scores
from cloudburst.training.job import TrainingOutcome, run_training

__all__ = [
    "FIGURES",
    "GENERATIVE_FIGURES",
    "log_evaluation",
    "train_and_evaluate",
]

log = logging.getLogger(__name__)

FIGURES = (
    "reconstructions",
    "qq_reconstruction",
    "quantized_mse",
    "samples",
    "latent_interpolation",
)


@torch.no_grad()
def log_evaluation(
    cfg: TrainJobConfig,
    packaged: PrecipitationModel,
    run_id: str,
    *,
    limit: int = 256,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, float]:
    """Compute and log (to ``run_id`` on MLflow's current tracking URI) the evaluation.

    The model runs on CPU. Returns the logged metrics.
    """
    packaged.model.cpu().eval()
    data = split_windows(cfg, packaged.transform, limit)
    if not packaged.plays(LatentModel):
        return _log_generative_evaluation(cfg, packaged, data, run_id, seed=seed)
    model = packaged.network(LatentModel)
    x, mask, stats = data["x"], data["mask"], data["stats"]
    # the bins of the statistics the model was made with (its training split's), if it has them
    model_edges = (packaged.stats or {}).get("histogram_edges") or stats.histogram_edges
    edges = torch.tensor(model_edges, dtype=torch.float64)
    rec = reconstruction_scores(
        model, x, mask, packaged.transform, edges, prefix="eval_", batch_size=batch_size
    )
    phys, phys_hat, mse, counts, metrics = rec.phys, rec.phys_hat, rec.mse, rec.counts, rec.metrics

    client = MlflowClient()
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    client.set_tag(run_id, "evaluation_split", f"{data['part']} ({x.shape[0]} windows)")

    units = stats.units or packaged.units
    wettest = torch.argsort(phys.flatten(1).sum(1), descending=True)[:4]
    latent = int(model.latent_size)
    generator = torch.Generator().manual_seed(int(seed))
    z = torch.randn(2, latent, generator=generator)
    line = figures.latent_line(z[0], z[1], points=5)
    made = {
        "reconstructions": figures.inputs_and_reconstructions(
            phys[wettest], phys_hat[wettest], units, n=4
        ),
        "qq_reconstruction": figures.qq_plot(phys[mask], phys_hat[mask], units),
        "quantized_mse": figures.quantized_mse_per_bin(
            edges, {f"{_model_label(packaged)} ({data['part']})": mse}, counts, units=units
        ),
        "samples": figures.samples_grid(packaged.sample(8, seed=seed), units),
        "latent_interpolation": figures.latent_interpolation(
            physical(packaged.transform, model.decode(line)), units
        ),
    }
    for name in FIGURES:
        tracking.log_figure(made[name], f"figures/{name}.png", run_id=run_id)
    return metrics


GENERATIVE_FIGURES = ("samples", "intensity_histograms", "transformation")


@torch.no_grad()
def _log_generative_evaluation(
    cfg: TrainJobConfig,
    packaged: PrecipitationModel,
    data: dict[str, Any],
    run_id: str,
    *,
    seed: int = 0,
    samples: int = 16,
) -> dict[str, float]:
    """For models that are not latent models (diffusion...): samples against the evaluation
    windows (quantiles, intensity histograms) and, where the network transforms its input
    itself, the transformation's curve."""
    x, mask, stats = data["x"], data["mask"], data["stats"]
    phys = physical(packaged.transform, x)[mask].numpy()
    generated = packaged.sample(samples, seed=seed)
    flat = generated.ravel()
    metrics = {"eval_mean_input": float(phys.mean()), "eval_mean_sample": float(flat.mean())}
    for q in QUANTILES:
        metrics[f"eval_q{q}_input"] = float(np.quantile(phys, q))
        metrics[f"eval_q{q}_sample"] = float(np.quantile(flat, q))
    client = MlflowClient()
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    client.set_tag(run_id, "evaluation_split", f"{data['part']} ({x.shape[0]} windows)")
    units = stats.units or packaged.units
    top = max(float(phys.max(initial=0.0)), float(flat.max(initial=0.0)), 1.0)
    edges = np.concatenate([[0.0], np.geomspace(0.01, 2.0 * top, 80)])
    counts = {
        f"{data['part']} windows": np.histogram(np.clip(phys, 0, edges[-1]), edges)[0],
        f"{samples} samples": np.histogram(np.clip(flat, 0, edges[-1]), edges)[0],
    }
    u = torch.linspace(0.0, 1.0, 201)
    title = f"{cfg.run.registered_model} on {cfg.data.store}"
    made = {
        "samples": figures.samples_grid(generated[:8], units),
        "intensity_histograms": figures.intensity_histograms(
            edges, counts, units, f"intensities: {title}"
        ),
    }
    if packaged.plays(TransformedInput):
        network = packaged.network(TransformedInput)
        made["transformation"] = figures.transformation_curve(
            physical(packaged.transform, u).numpy(),
            network.to_model_space(u).numpy(),
            units,
            f"input transformation ({packaged.config.get('transform', '')}): {title}",
        )
    for name in GENERATIVE_FIGURES:
        if name not in made:
            continue
        tracking.log_figure(made[name], f"figures/{name}.png", run_id=run_id)
    return metrics


def _model_label(packaged: PrecipitationModel) -> str:
    """What tells this model apart in a legend: its loss, else its family."""
    return str(packaged.config.get("loss") or packaged.name)


def train_and_evaluate(cfg: TrainJobConfig, sizes: dict[str, int], uri: str) -> TrainingOutcome:
    """The training job: :func:`~cloudburst.training.job.run_training`, then
    :func:`log_evaluation` of the registered model into its run. A failed evaluation is
    logged as a warning; the model stays registered."""
    outcome = run_training(cfg, sizes, uri)
    assert outcome.packaged is not None
    try:
        outcome.metrics = log_evaluation(cfg, outcome.packaged, outcome.run_id)
    except Exception as exc:  # noqa: BLE001 - the model is registered; report, do not fail
        log.warning("evaluation failed: %r", exc)
    else:
        top = ", ".join(f"{k} {v:.4g}" for k, v in outcome.metrics.items() if "_top" in k)
        log.info("evaluation figures and scores logged (%s)", top or "no bins")
    return outcome
