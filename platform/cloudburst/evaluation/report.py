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

from cloudburst import registry_notes, tracking
from cloudburst.config import TrainJobConfig
from cloudburst.data.samples import split_windows
from cloudburst.evaluation import comparisons, figures
from cloudburst.models.package import PrecipitationModel
from cloudburst.models.roles import (
    DiscreteCoder,
    Generative,
    LatentModel,
    Reconstructor,
    TransformedInput,
    Translator,
)
from cloudburst.models.scoring import (
    QUANTILES,
    physical,
    reconstruction_scores,
    reconstructor_scores,
)
from cloudburst.training.job import TrainingOutcome, run_training

__all__ = [
    "CODER_FIGURES",
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
    if packaged.target is not None:
        return _log_translation_evaluation(cfg, packaged, run_id, limit=limit, seed=seed)
    data = split_windows(cfg, packaged.transform, limit)
    if not packaged.plays(LatentModel) and packaged.plays(Generative):
        return _log_generative_evaluation(cfg, packaged, data, run_id, seed=seed)
    if not packaged.plays(LatentModel):
        return _log_coder_evaluation(packaged, data, run_id, batch_size=batch_size)
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


CODER_FIGURES = ("reconstructions", "qq_reconstruction", "quantized_mse")
BASELINE_STEPS = 300  # Adam steps of the convolutional regression baseline
BASELINE_MAX_PARAMETERS = 50_000  # its size: the translator's, up to this many parameters


def _log_translation_evaluation(
    cfg: TrainJobConfig,
    packaged: PrecipitationModel,
    run_id: str,
    *,
    limit: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    """For a model trained on a pair of variables: SSIM, PSNR and MAE of its translations of
    held-out windows (the test split, else validation; never a training frame) against the
    targets, beside two baselines fitted on training windows only: the input linearly mapped
    (least squares) and a small convolutional regression trained with MSE (the translator's
    size, up to :data:`BASELINE_MAX_PARAMETERS`); the codebook usage of a discrete coder;
    the table as ``translation.md`` and the figure ``figures/translation.png``. Scores are in
    the variables' normalised units (data range 1)."""
    import tempfile

    from cloudburst.evaluation.translation import (
        ConvRegression,
        LinearMapBaseline,
        image_scores,
        translation_figure,
        translation_table,
    )

    assert packaged.target is not None
    net = packaged.network(Translator)
    target_transform = packaged.target.transform

    def windows(part: str, n: int) -> dict[str, Any]:
        return split_windows(cfg, packaged.transform, n, part, target_transform=target_transform)

    try:
        held = windows("test", limit)
    except ValueError:  # no test split: validation windows (training ones only if none)
        held = windows("val", limit)
    part = str(held["part"])
    train = windows("train", 4 * limit)
    x, target = held["x"], held["target"]
    valid = (held["mask"] & held["target_mask"])[:, 0].numpy()
    with torch.no_grad():
        made = torch.cat([net.translate(c).float() for c in x.split(64)])[:, 0].numpy()
    inputs, truth = x[:, 0].numpy(), target[:, 0].numpy()
    train_valid = (train["mask"] & train["target_mask"])[:, 0].numpy()
    linear = LinearMapBaseline().fit(
        train["x"][:, 0].numpy(), train["target"][:, 0].numpy(), mask=train_valid
    )
    size = sum(p.numel() for p in packaged.model.parameters())
    conv = ConvRegression.for_parameter_count(min(size, BASELINE_MAX_PARAMETERS))
    whole = train_valid.reshape(len(train_valid), -1).all(axis=1)
    conv.fit(
        train["x"][whole][:, 0].numpy(),
        train["target"][whole][:, 0].numpy(),
        steps=BASELINE_STEPS,
        seed=seed,
    )
    outputs = {
        f"{packaged.name}": made,
        "linear map": linear.predict(inputs),
        "conv regression": conv.predict(inputs),
    }
    rows = {}
    metrics: dict[str, float] = {}
    for (label, out), key in zip(outputs.items(), ("", "linear_", "conv_"), strict=True):
        scores = image_scores(out, truth, data_range=1.0, mask=valid)
        rows[label] = {**scores, "parameters": (size, 2, conv.parameter_count)[len(rows)]}
        for name in ("ssim", "psnr", "mae"):
            metrics[f"eval_{key}{name}"] = float(scores[name])
    if packaged.plays(DiscreteCoder):
        coder = packaged.network(DiscreteCoder)
        codes = torch.cat([coder.encode_codes(c) for c in x.split(64)])
        counts = torch.bincount(codes.flatten(), minlength=int(coder.codebook_size))
        metrics["eval_codebook_usage"] = float((counts > 0).double().mean())
        rows[packaged.name]["codebook usage"] = metrics["eval_codebook_usage"]
    client = MlflowClient()
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    client.set_tag(run_id, "evaluation_split", f"{part} ({x.shape[0]} windows)")
    table = translation_table(rows)
    client.log_text(run_id, table, "translation.md")
    log.info("translation of the %s windows:\n%s", part, table)
    with tempfile.TemporaryDirectory() as folder:
        path = translation_figure(
            inputs,
            truth,
            outputs,
            f"{folder}/translation.png",
            title=f"{packaged.input_variable} to {packaged.target.variable}: {part} windows",
        )
        client.log_artifact(run_id, str(path), "figures")
    return metrics


@torch.no_grad()
def _log_coder_evaluation(
    packaged: PrecipitationModel,
    data: dict[str, Any],
    run_id: str,
    *,
    batch_size: int = 64,
) -> dict[str, float]:
    """For deterministic reconstructions that do not sample (a VQ-VAE as a compressor of
    the field): the reconstruction scores of latent models (quantized MSE per bin, tail
    quantiles, bias, wet fraction), and for discrete coders the share of the codebook the
    windows use, the perplexity of their codes and the compression ratio of the codes
    against float32 values (:func:`cloudburst.products.codes.compression_ratio`)."""
    from cloudburst.products.codes import compression_ratio

    model = packaged.network(Reconstructor)
    x, mask, stats = data["x"], data["mask"], data["stats"]
    model_edges = (packaged.stats or {}).get("histogram_edges") or stats.histogram_edges
    edges = torch.tensor(model_edges, dtype=torch.float64)
    rec = reconstructor_scores(
        model, x, mask, packaged.transform, edges, prefix="eval_", batch_size=batch_size
    )
    metrics = dict(rec.metrics)
    if packaged.plays(DiscreteCoder):
        coder = packaged.network(DiscreteCoder)
        codes = torch.cat([coder.encode_codes(chunk) for chunk in x.split(batch_size)])
        counts = torch.bincount(codes.flatten(), minlength=int(coder.codebook_size)).double()
        freq = counts / counts.sum()
        entropy = -(freq[freq > 0] * freq[freq > 0].log()).sum()
        metrics["eval_codebook_usage"] = float((counts > 0).double().mean())
        metrics["eval_perplexity"] = float(entropy.exp())
        metrics["eval_compression_ratio"] = compression_ratio(
            tuple(x.shape[2:]), tuple(codes.shape[1:]), int(coder.codebook_size)
        )
    client = MlflowClient()
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    client.set_tag(run_id, "evaluation_split", f"{data['part']} ({x.shape[0]} windows)")
    units = stats.units or packaged.units
    wettest = torch.argsort(rec.phys.flatten(1).sum(1), descending=True)[:4]
    made = {
        "reconstructions": figures.inputs_and_reconstructions(
            rec.phys[wettest], rec.phys_hat[wettest], units, n=4
        ),
        "qq_reconstruction": figures.qq_plot(rec.phys[mask], rec.phys_hat[mask], units),
        "quantized_mse": figures.quantized_mse_per_bin(
            edges, {f"{_model_label(packaged)} ({data['part']})": rec.mse}, rec.counts, units=units
        ),
    }
    for name in CODER_FIGURES:
        tracking.log_figure(made[name], f"figures/{name}.png", run_id=run_id)
    return metrics


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
        "intensity_histograms": comparisons.intensity_histograms(
            edges, counts, units, f"intensities: {title}"
        ),
    }
    if packaged.plays(TransformedInput):
        network = packaged.network(TransformedInput)
        made["transformation"] = comparisons.transformation_curve(
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
    :func:`log_evaluation` of the registered model into its run, and its scores and figures
    into the version's description (:func:`cloudburst.registry_notes.record_evaluation`). A
    failed evaluation is logged as a warning; the model stays registered."""
    outcome = run_training(cfg, sizes, uri)
    assert outcome.packaged is not None
    try:
        outcome.metrics = log_evaluation(cfg, outcome.packaged, outcome.run_id)
    except Exception as exc:  # noqa: BLE001 - the model is registered; report, do not fail
        log.warning("evaluation failed: %r", exc)
    else:
        shown = [k for k in outcome.metrics if "_top" in k] or list(outcome.metrics)[:3]
        top = ", ".join(f"{k} {outcome.metrics[k]:.4g}" for k in shown)
        log.info("evaluation figures and scores logged (%s)", top or "no scores")
        # the version's description gets the scores and figures (warns, never raises)
        registry_notes.record_evaluation(
            cfg.run.registered_model, outcome.version, outcome.run_id, outcome.metrics
        )
    return outcome
