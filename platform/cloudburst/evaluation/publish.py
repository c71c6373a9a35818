"""Publishing an evaluation: figures, ``metrics.json`` and the MLflow run.

:func:`build_figures` draws every source on shared axes against the observed windows
(:mod:`cloudburst.evaluation.comparisons`), :func:`conditional_figures` the skill of conditional
stores by step; :func:`save_figures` writes them as PNG under ``OUT/figures``,
:func:`write_metrics` writes ``OUT/metrics.json`` atomically (:func:`nan_to_none` first: JSON
has no NaN), and :func:`log_to_mlflow` logs both to a run linked to the models' runs and adds
the scores to the descriptions of the registered versions evaluated
(:func:`cloudburst.registry_notes.record_published_evaluation`).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from cloudburst import registry_notes, tracking
from cloudburst.evaluation import comparisons, figures
from cloudburst.evaluation.entries import Entry
from cloudburst.evaluation.observations import FieldSummary, Observed, top_windows
from cloudburst.evaluation.request import EvaluationRequest

__all__ = [
    "build_figures",
    "conditional_figures",
    "log_to_mlflow",
    "nan_to_none",
    "save_figures",
    "write_metrics",
]


# ----------------------------------------------------------------------------- figures


def build_figures(
    entries: list[Entry],
    obs: Observed,
    obs_summary: FieldSummary,
    thresholds: dict[str, float],
    observed_levels: dict[str, Any] | None,
    request: EvaluationRequest,
) -> dict[str, Any]:
    units = obs.units
    data = f"{Path(obs.store.rstrip('/')).name} {obs.part}"
    made: dict[str, Any] = {}
    models = [e for e in entries if "qmse_per_bin" in e.curves]  # the ones that reconstruct
    names = ", ".join(e.label for e in entries)
    if models:
        rec = models[0].curves["qmse_per_bin"]
        made["quantized_mse"] = figures.quantized_mse_per_bin(
            rec["edges"],
            {e.label: e.curves["qmse_per_bin"]["mse"] for e in models},
            {e.label: e.curves["qmse_per_bin"]["counts"] for e in models},
            units=units,
        )
        figures.wrapped_title(made["quantized_mse"], f"quantized MSE per bin: {names} on {data}")
        qq = models[0].curves["qq_reconstruction"]
        made["qq_reconstruction"] = comparisons.qq_compare(
            qq["levels"],
            qq["observed"],
            {e.label: e.curves["qq_reconstruction"]["model"] for e in models},
            units,
            f"reconstruction QQ: {names} on {data}",
        )
    hist = {"observed": obs_summary.hist.counts} | {e.label: e.summary.hist.counts for e in entries}  # type: ignore[union-attr]
    made["intensity_histograms"] = comparisons.intensity_histograms(
        obs_summary.edges, hist, units, f"intensities: {names} on {data}", request.low_threshold
    )
    n_obs = int(np.isfinite(obs.x).sum())
    levels = figures.qq_levels(n_obs)
    others = {e.label: e.summary.quantiles.quantiles(levels) for e in entries}  # type: ignore[union-attr]
    observed_q = obs_summary.quantiles.quantiles(levels)
    made["qq_generation"] = comparisons.qq_compare(
        levels, observed_q, others, units, f"generated QQ: {names} on {data}"
    )
    for e in entries:
        e.curves["qq_generation"] = {
            "levels": levels,
            "observed": observed_q,
            "model": others[e.label],
        }
    made["bias_maps"] = comparisons.bias_maps(
        {e.label: e.curves["bias_map"] for e in entries}, f"mean-normalised bias on {data}"
    )
    for name, axis, accumulator, xlabel, what in (
        ("psd_spatial", "wavenumber", obs_summary.spatial, "wavenumber (cycles per window side)",
         "radially averaged spatial PSD"),
        ("psd_temporal", "frequency", obs_summary.temporal, "frequency (cycles per time step)",
         "temporal PSD of cell series"),
    ):  # fmt: skip
        curves = {"observed": accumulator.compute()} | {
            e.label: (e.curves[name][axis], e.curves[name]["power"]) for e in entries
        }
        made[name] = comparisons.spectra(
            curves, xlabel, f"{what}: {names} on {data}", ylabel=f"power (({units})²)"
        )
    # wet fraction and spell lengths: does a model drizzle everywhere, are dry spells short?
    spells = {"observed": obs_summary.spells.curves()} | {
        e.label: e.summary.spells.curves()  # type: ignore[union-attr]
        for e in entries
    }
    wet = obs_summary.wet_threshold
    made["wet_dry_spells"] = comparisons.wet_dry_spells(
        spells,
        f"wet and dry spells (wet: > {wet:g}{' ' + units if units else ''}): {names} on {data}",
    )
    # the extremes check: QQ of the top-N windows by total
    top_obs = obs.x[top_windows(obs.x, request.top_n, obs_summary.extreme)]
    tl = figures.qq_levels(int(np.isfinite(top_obs).sum()))
    top_curves: dict[str, Any] = {}
    for e in models:
        if e.recon_top is not None and e.recon_top.size:
            top_curves[f"{e.label} reconstructed"] = np.quantile(_finite(e.recon_top), tl)
    for e in entries:
        if e.summary is not None and e.summary.top is not None and e.summary.top.size:
            top_curves[f"{e.label} generated"] = np.quantile(_finite(e.summary.top), tl)
    if tl.size and top_curves:  # no observed window above q0.99: nothing to compare
        made["extremes_qq"] = comparisons.qq_compare(
            tl,
            np.quantile(_finite(top_obs), tl),
            top_curves,
            units,
            f"top {request.top_n} windows by total with a pixel > q0.99 "
            f"({obs_summary.extreme:.3g} {units}): {names} on {data}",
        )
    rank = {
        e.label: e.curves.get("cond_rank_histogram") or e.curves.get("clim_rank_histogram")
        for e in entries
    }
    rank = {k2: v for k2, v in rank.items() if v is not None}
    if rank:
        made["rank_histogram"] = comparisons.rank_histograms(rank, f"rank histograms on {data}")
    for name in thresholds:
        rel = {}
        for e in entries:
            r = e.curves.get(f"cond_reliability_{name}") or e.curves.get(f"clim_reliability_{name}")
            if r is not None:
                rel[e.label] = r
        if rel:
            made[f"reliability_{name}"] = comparisons.reliability_diagram(
                rel, f"reliability of P(> {thresholds[name]:.3g} {units}) on {data}"
            )
    rl = {e.label: e.curves["return_levels"] for e in entries if e.curves.get("return_levels")}
    if observed_levels is not None:
        rl = {"observed": observed_levels} | rl
    if rl:
        made["return_levels"] = comparisons.return_levels(
            rl,
            units,
            f"return levels of window maxima: {names} on {data}",
            period_label=f"return period (windows of {obs.x.shape[1]} steps)",
        )
    for e in models:
        if e.interpolation is not None:
            fig = figures.latent_interpolation(e.interpolation, units)
            figures.wrapped_title(fig, f"latent interpolation: {e.label}")
            made[f"latent_interpolation_{_slug(e.label)}"] = fig
    return made


def conditional_figures(entries: list[Entry], units: str) -> dict[str, Any]:
    by_step = {e.label: e.curves["cond_by_step"] for e in entries if "cond_by_step" in e.curves}
    if not by_step:
        return {}
    names = ", ".join(by_step)
    made = {
        "conditional_crps": comparisons.conditional_skill(
            by_step, units, f"CRPS on the withheld steps by hour: {names}"
        ),
        "conditional_rank_histograms": comparisons.rank_histograms(
            {
                e.label: e.curves["cond_rank_histogram"]
                for e in entries
                if "cond_by_step" in e.curves
            },
            f"rank of the withheld observation among the members: {names}",
        ),
    }
    return made


def _finite(a: Any) -> np.ndarray:
    flat = np.asarray(a, dtype=np.float64).ravel()
    return flat[np.isfinite(flat)]


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-.]+", "-", label).strip("-")


# ----------------------------------------------------------------------------- outputs


def save_figures(made: dict[str, Any], out: Path) -> list[Path]:
    """PNG files under ``out/figures`` for every figure in ``made``; their paths."""
    from matplotlib.figure import Figure

    (out / "figures").mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in made.items():
        if isinstance(fig, Figure):
            path = out / "figures" / f"{name}.png"
            fig.savefig(path, dpi=100)
            paths.append(path)
    return paths


def nan_to_none(tree: Any) -> Any:
    """JSON has no NaN: NaN and infinities become null."""
    if isinstance(tree, dict):
        return {k: nan_to_none(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [nan_to_none(v) for v in tree]
    if isinstance(tree, np.ndarray):
        return nan_to_none(tree.tolist())
    if isinstance(tree, np.generic):
        tree = tree.item()
    if isinstance(tree, float) and not np.isfinite(tree):
        return None
    return tree


def write_metrics(report: dict[str, Any], out: Path) -> Path:
    """``out/metrics.json``, replaced atomically (written beside it, then renamed)."""
    metrics_path = out / "metrics.json"
    tmp = metrics_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, metrics_path)
    return metrics_path


# ------------------------------------------------------------------------------ MLflow


def log_to_mlflow(
    request: EvaluationRequest,
    report: dict[str, Any],
    entries: list[Entry],
    paths: list[Path],
    metrics_path: Path,
) -> str:
    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    tracking.use_experiment(request.experiment)
    name = request.run_name or "evaluate " + ", ".join(e.label for e in entries)
    with mlflow.start_run(run_name=name[:250]) as run:
        rid = run.info.run_id
        client = MlflowClient()
        now = int(time.time() * 1000)
        metrics = [
            Metric(f"{_slug(e.label)}.{k}", float(v), now, 0)
            for e in entries
            for k, v in e.metrics.items()
            if v is not None and np.isfinite(v)
        ]
        for a in range(0, len(metrics), 900):
            client.log_batch(rid, metrics=metrics[a : a + 900])
        mlflow.log_params(
            {
                "data": request.data,
                "split": report["data"]["split"][:500],
                "windows": report["data"]["windows"],
                "samples": request.samples,
                "members": request.members,
                "seed": request.seed,
            }
        )
        links = {e.label: e.source.get("run_id") for e in entries}
        mlflow.set_tags(
            {
                "evaluated": json.dumps(
                    [e.source.get("version_uri") or e.source.get("url") for e in entries]
                )[:5000],
                "evaluated_runs": json.dumps(links)[:5000],
                "mlflow.note.content": "Evaluation of "
                + ", ".join(e.label for e in entries)
                + f" on {request.data} ({report['data']['split']}).",
            }
        )
        mlflow.log_artifact(str(metrics_path))
        for p in paths:
            mlflow.log_artifact(str(p), artifact_path="figures")
        for e in entries:
            if e.source.get("run_id"):
                client.set_tag(e.source["run_id"], "last_evaluation_run", rid)
        figure_paths = [f"figures/{p.name}" for p in paths] + [f"{metrics_path.name}"]
        for e in entries:  # registered versions: their descriptions and gate metric tags
            if e.kind == "model" and str(e.source.get("version_uri") or "").startswith("models:/"):
                registry_notes.record_published_evaluation(
                    str(e.source["version_uri"]),
                    run_id=rid,
                    label=e.label,
                    metrics=e.metrics,
                    data=request.data,
                    split=str(report["data"]["split"]),
                    figures=figure_paths,
                    family=e.source.get("model"),
                    others=[o.label for o in entries if o is not e],
                    client=client,
                )
    return rid
