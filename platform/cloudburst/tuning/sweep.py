"""A sweep: validate, run the trials on Ray Tune, choose the best, register it.

:func:`prepare` checks everything a sweep can get wrong before any trial starts: the base
config loads, every key of the space is a field of it, points of the space (every point of a
grid) build valid training configs, the objective and bias metrics are ones the model family
reports every epoch, one trial's workers fit the cluster. :func:`run_sweep` then opens the
parent MLflow run (experiment ``cloudburst-sweeps``), runs the trials
(:func:`cloudburst.tuning.trial.run_trial`, nested child runs), and when they are done logs
the results table (CSV), the Pareto front of the tail objective against the bulk bias and a
parallel-coordinates figure to the parent run, and registers the best finished trial's model
with the alias ``candidate`` and tags naming the sweep. The finished trials of the front are
then scored on the base config's test split (:mod:`cloudburst.tuning.holdout`, the parent's
``holdout.csv``), which the selection never saw. :func:`resume_sweep` continues a
sweep whose driver died (``Tuner.restore``: finished trials are kept, errored ones retried).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from cloudburst import arrow_fs, registry_notes, storage, tracking
from cloudburst.config import TrainJobConfig, load_config
from cloudburst.models import registry
from cloudburst.schema import ConfigError
from cloudburst.tuning import space as space_mod
from cloudburst.tuning.config import Asha, SweepConfig
from cloudburst.tuning.holdout import score_holdout
from cloudburst.tuning.selection import Selection, pareto_front, select
from cloudburst.tuning.trial import (
    FINISHED,
    MODEL_TAG,
    SWEEP_TAG,
    TRIAL_MEMORY,
    TRIAL_TAG,
    run_trial,
    trial_config,
)

__all__ = [
    "ALWAYS_REPORTED",
    "Prepared",
    "SweepError",
    "SweepOutcome",
    "prepare",
    "resume_sweep",
    "run_sweep",
]

log = logging.getLogger(__name__)

STATE_FILE = "cloudburst-sweep.json"
ALWAYS_REPORTED = ("val_loss", "best_val_loss", "train_loss")
CHECKED_POINTS = 64  # points of the space built into configs before the sweep starts


class SweepError(ValueError):
    """A sweep that cannot run as asked; the message names the problem and the fix."""


@dataclass
class Prepared:
    """A sweep checked and ready: its training config (paths absolute) as a tree for trials."""

    sweep: SweepConfig
    base: TrainJobConfig
    tree: dict[str, Any]
    tracking_uri: str
    storage_path: str


@dataclass
class SweepOutcome:
    """What a sweep made: the results table, the selection, and the registered version."""

    sweep: SweepConfig
    parent_run_id: str
    rows: list[dict[str, Any]]
    selection: Selection
    model_uri: str | None = None
    version: str | None = None
    figures: list[str] = field(default_factory=list)
    holdout: list[dict[str, Any]] = field(default_factory=list)


def _base(sweep: SweepConfig) -> TrainJobConfig:
    res = sweep.resources
    overrides = [
        *sweep.overrides,
        f"train.workers={res.workers}",
        f"train.cpus_per_worker={res.cpus_per_worker}",
    ]
    if res.gpus_per_worker > 0:
        overrides += ["train.use_gpu=true", f"train.gpus_per_worker={res.gpus_per_worker}"]
    else:
        overrides += ["train.use_gpu=false"]
    try:
        return load_config(TrainJobConfig, sweep.base, overrides)
    except ConfigError as exc:
        raise SweepError(f"sweep {sweep.name}: the base config {sweep.base}: {exc}") from None


def reported_metrics(kind: str) -> tuple[str, ...]:
    """The per-epoch metrics a family reports (its declared ones and the losses)."""
    return (*ALWAYS_REPORTED, *registry.family(kind).metrics)


def prepare(sweep: SweepConfig) -> Prepared:
    """Check ``sweep`` (see the module docstring); raises :class:`SweepError`."""
    from cloudburst.training.job import check

    base = _base(sweep)
    try:
        space_mod.check_keys(base, dict(sweep.space))
    except space_mod.SpaceError as exc:
        raise SweepError(str(exc)) from None
    for key in ("run.name", "run.storage_path", "run.tracking_uri", "train.workers"):
        if key in sweep.space:
            raise SweepError(
                f"search space key {key!r} is set by the sweep itself; remove it (resources "
                "go in resources:, storage and tracking in run:)"
            )
    reported = reported_metrics(base.model.kind)
    for what, metric in (
        ("objective.metric", sweep.objective.metric),
        ("objective.bias_metric", sweep.objective.bias_metric),
    ):
        if metric is not None and metric not in reported:
            raise SweepError(
                f"{what} {metric!r} is not a metric the {base.model.kind} family reports every "
                f"epoch; it reports: {', '.join(reported)}"
            )
    if isinstance(sweep.scheduler, Asha) and sweep.scheduler.grace_period >= base.train.epochs:
        raise SweepError(
            f"scheduler.grace_period {sweep.scheduler.grace_period} leaves ASHA no epoch to stop "
            f"a trial at (train.epochs is {base.train.epochs}); lower it or train longer"
        )
    storage_path = sweep.run.storage_path or base.run.storage_path
    base.run.storage_path = storage_path
    if sweep.run.tracking_uri is not None:
        base.run.tracking_uri = sweep.run.tracking_uri
    cfg, _, uri = check(base)
    tree = cfg.model_dump(mode="json")
    for point in space_mod.points(dict(sweep.space), CHECKED_POINTS, seed=sweep.search.seed):
        try:
            trial_config(tree, point)
        except ConfigError as exc:
            raise SweepError(
                f"sweep {sweep.name}: a point of the search space is not a valid training "
                f"config: {exc}"
            ) from None
    return Prepared(sweep, cfg, tree, uri, cfg.run.storage_path)


def check_resources(sweep: SweepConfig) -> None:
    """Raise :class:`SweepError` when one trial's workers cannot fit the cluster (it would
    wait forever); log how many trials can run at once when fewer than ``concurrent``."""
    import ray

    res = sweep.resources
    have = ray.cluster_resources()
    need_cpu = res.workers * res.cpus_per_worker
    need_gpu = res.workers * res.gpus_per_worker
    cpus, gpus = float(have.get("CPU", 0)), float(have.get("GPU", 0))
    if need_cpu > cpus or need_gpu > gpus:
        raise SweepError(
            f"one trial needs {need_cpu:g} CPUs and {need_gpu:g} GPUs ({res.workers} workers) "
            f"but the cluster has {cpus:g} CPUs and {gpus:g} GPUs; lower resources.workers, "
            "cpus_per_worker or gpus_per_worker, or add nodes"
        )
    at_once = min(
        int(cpus // need_cpu) if need_cpu else sweep.concurrent,
        int(gpus // need_gpu) if need_gpu else sweep.concurrent,
    )
    if at_once < sweep.concurrent:
        log.warning(
            "concurrent is %d but the cluster fits %d trials at once; the others queue",
            sweep.concurrent,
            at_once,
        )


# --------------------------------------------------------------------------------- state


def _state_url(storage_path: str, name: str) -> str:
    return storage.join(storage_path, name, STATE_FILE)


def _write_state(prepared: Prepared, parent: str, experiment_id: str) -> None:
    state = {
        "sweep": prepared.sweep.model_dump(mode="json"),
        "parent_run_id": parent,
        "experiment_id": experiment_id,
        "tracking_uri": prepared.tracking_uri,
    }
    url = _state_url(prepared.storage_path, prepared.sweep.name)
    opts = storage.options_from(url, prepared.base.storage)
    storage.write_bytes_atomic(url, json.dumps(state, indent=2).encode(), opts)


def read_state(storage_path: str, name: str) -> dict[str, Any]:
    """The saved state of sweep ``name`` under ``storage_path`` (for a resume)."""
    url = _state_url(_absolute(storage_path), name)
    try:
        return json.loads(storage.read_bytes(url, storage.storage_options(url)))
    except FileNotFoundError:
        raise SweepError(
            f"no sweep {name!r} under {storage_path} (no {STATE_FILE}); check --storage-path "
            "and the name, or start it with --config"
        ) from None


def _absolute(url: str) -> str:
    return url if storage.is_remote(url) else os.path.abspath(storage.local_path(url))


# ----------------------------------------------------------------------------------- tune


def _tuner(prepared: Prepared, spec: dict[str, Any]) -> Any:
    from ray import tune

    from cloudburst.tuning.progress import TrialProgress

    sweep = prepared.sweep
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec=spec), {"CPU": 0, "memory": TRIAL_MEMORY}
    )
    scheduler = None
    metric_mode: dict[str, Any] = {}
    if isinstance(sweep.scheduler, Asha):
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            # one more than the epochs: a trial's last epoch is never cut short before its
            # model is packaged (the trial's final report comes after it)
            max_t=prepared.base.train.epochs + 1,
            grace_period=sweep.scheduler.grace_period,
            reduction_factor=sweep.scheduler.reduction_factor,
        )
        metric_mode = {"metric": sweep.objective.metric, "mode": sweep.objective.mode}
    search_alg = None
    if sweep.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=sweep.search.seed)
        metric_mode = {"metric": sweep.objective.metric, "mode": sweep.objective.mode}
    space = {key: space_mod.to_tune(domain) for key, domain in sweep.space.items()}
    storage_path, filesystem = _ray_storage(prepared)
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            num_samples=sweep.samples,
            max_concurrent_trials=sweep.concurrent,
            scheduler=scheduler,
            search_alg=search_alg,
            **metric_mode,
        ),
        run_config=tune.RunConfig(
            name=sweep.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            verbose=1,
            failure_config=tune.FailureConfig(max_failures=1),
            callbacks=[TrialProgress(sweep.name)],
        ),
    )


def _ray_storage(prepared: Prepared, *parts: str) -> tuple[str, Any]:
    """Tune's (storage path, pyarrow filesystem) for the sweep's storage (or a folder in it)."""
    url = storage.join(prepared.storage_path, *parts)
    return arrow_fs.ray_storage(url, storage.options_from(url, prepared.base.storage))


def _spec(prepared: Prepared, parent: str, experiment_id: str) -> dict[str, Any]:
    return {
        "base": prepared.tree,
        "keys": list(prepared.sweep.space),
        "sweep": prepared.sweep.name,
        "parent_run_id": parent,
        "experiment_id": experiment_id,
        "model_modules": registry.plugin_modules(),
    }


def run_sweep(sweep: SweepConfig) -> SweepOutcome:
    """Run ``sweep`` from the start; see the module docstring."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from cloudburst.training.job import ensure_ray

    prepared = prepare(sweep)
    ensure_ray()
    check_resources(sweep)
    mlflow.set_registry_uri(prepared.tracking_uri)
    experiment_id = tracking.use_experiment(sweep.run.experiment)
    client = MlflowClient(prepared.tracking_uri)
    parent = client.create_run(experiment_id, run_name=sweep.name, tags={SWEEP_TAG: sweep.name})
    parent_id = parent.info.run_id
    try:
        client.log_dict(parent_id, sweep.model_dump(mode="json"), "sweep.json")
        client.log_dict(parent_id, prepared.tree, "base-config.json")
        client.log_param(parent_id, "base", sweep.base)
        client.log_param(parent_id, "trials", sweep.trials())
        client.log_param(parent_id, "space", ", ".join(sweep.space))
        _write_state(prepared, parent_id, experiment_id)
        grid = _tuner(prepared, _spec(prepared, parent_id, experiment_id)).fit()
        return _finish(prepared, grid, parent_id, experiment_id)
    except BaseException:
        client.set_terminated(parent_id, "FAILED")
        raise


def resume_sweep(name: str, storage_path: str) -> SweepOutcome:
    """Continue sweep ``name`` (its state under ``storage_path``): finished trials are kept,
    unfinished and errored ones run again, then the sweep finishes as :func:`run_sweep`."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    from cloudburst.training.job import ensure_ray

    state = read_state(storage_path, name)
    sweep = SweepConfig.model_validate(state["sweep"])
    prepared = prepare(sweep)
    ensure_ray()
    check_resources(sweep)
    parent_id, experiment_id = state["parent_run_id"], state["experiment_id"]
    client = MlflowClient(prepared.tracking_uri)
    client.update_run(parent_id, status="RUNNING")
    path, filesystem = _ray_storage(prepared, name)
    spec = _spec(prepared, parent_id, experiment_id)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec=spec), {"CPU": 0, "memory": TRIAL_MEMORY}
    )
    try:
        tuner = tune.Tuner.restore(
            path, trainable=trainable, resume_errored=True, storage_filesystem=filesystem
        )
        grid = tuner.fit()
        return _finish(prepared, grid, parent_id, experiment_id)
    except BaseException:
        client.set_terminated(parent_id, "FAILED")
        raise


# -------------------------------------------------------------------------------- results


def _rows(prepared: Prepared, grid: Any, experiment_id: str, parent: str) -> list[dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(prepared.tracking_uri)
    children = {
        r.data.tags.get(TRIAL_TAG): r
        for r in client.search_runs(
            [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'"
        )
    }
    rows = []
    for result in grid:
        metrics = dict(result.metrics or {})
        trial = str(metrics.get("trial_id") or (result.path or "").rsplit("_", 1)[-1])
        child = children.get(trial)
        status = (
            "error"
            if result.error is not None
            else FINISHED
            if metrics.get(FINISHED) == 1.0 and child is not None
            else "stopped"
        )
        row: dict[str, Any] = {"trial_id": trial, "status": status}
        row |= {f"param:{k}": result.config.get(k) for k in prepared.sweep.space}
        row["epochs"] = metrics.get("training_iteration", 0) - (1 if status == FINISHED else 0)
        row |= {
            k: float(v)
            for k, v in metrics.items()
            if k.startswith(("val_", "train_", "best_")) and isinstance(v, int | float)
        }
        row["run_id"] = child.info.run_id if child is not None else ""
        row["model_uri"] = child.data.tags.get(MODEL_TAG, "") if child is not None else ""
        rows.append(row)
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def table_csv(rows: list[dict[str, Any]]) -> str:
    """The results table as CSV: one row per trial, every column any trial has."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns and not k.startswith("val_qmse_bin_")]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in columns})
    return out.getvalue()


def _finish(prepared: Prepared, grid: Any, parent: str, experiment_id: str) -> SweepOutcome:
    from mlflow.tracking import MlflowClient

    from cloudburst.tuning import figures

    sweep = prepared.sweep
    client = MlflowClient(prepared.tracking_uri)
    rows = _rows(prepared, grid, experiment_id, parent)
    selection = select(rows, sweep.objective)
    front = pareto_front(rows, sweep.objective)
    client.log_text(parent, table_csv(rows), "results.csv")
    client.log_dict(parent, {"front": [r["trial_id"] for r in front]}, "pareto.json")
    counts = {s: sum(r["status"] == s for r in rows) for s in (FINISHED, "stopped", "error")}
    for status, n in counts.items():
        client.log_metric(parent, f"trials_{status}", n)
    names = []
    for name, fig in (
        ("pareto.png", figures.pareto(rows, front, sweep.objective, sweep.name)),
        ("parallel_coordinates.png", figures.parallel(rows, list(sweep.space), sweep.objective)),
    ):
        if fig is not None:
            tracking.log_figure(fig, f"figures/{name}", run_id=parent)
            names.append(name)
    outcome = SweepOutcome(sweep, parent, rows, selection, figures=names)
    best = selection.best
    if sweep.holdout:
        scored = [r["trial_id"] for r in front] + ([best["trial_id"]] if best else [])
        outcome.holdout = score_holdout(
            rows, scored, prepared.base, tracking_uri=prepared.tracking_uri, limit=sweep.holdout
        )
        if outcome.holdout:
            client.log_text(parent, table_csv(outcome.holdout), "holdout.csv")
    client.set_tag(parent, "cloudburst.sweep.selection", selection.reason)
    if best is not None and best.get("model_uri"):
        packaged = tracking.load_model(str(best["model_uri"]))
        name = sweep.run.registered_model or prepared.base.run.registered_model
        value = float(best[sweep.objective.metric])
        tags = tracking.default_tags(packaged) | {
            "dataset": prepared.base.data.store,
            "sweep": sweep.name,
            "sweep_run_id": parent,
            "sweep_trial": best["trial_id"],
            "sweep_objective": f"{sweep.objective.metric}={value:.6g}",
            "sweep_feasible": str(selection.feasible).lower(),
        }
        outcome.version, outcome.model_uri = tracking.register_model(
            str(best["model_uri"]), name=name, tags=tags, alias="candidate"
        )
        registry_notes.record_sweep(  # warns, never raises
            name,
            outcome.version,
            sweep=sweep.name,
            parent_run_id=parent,
            trial=str(best["trial_id"]),
            chosen={k[len("param:") :]: v for k, v in best.items() if k.startswith("param:")},
            objective=sweep.objective.metric,
            mode=sweep.objective.mode,
            value=value,
            reason=selection.reason,
            trials=counts,
            figures=[f"figures/{n}" for n in names],
            client=client,
        )
        client.log_metric(parent, f"best_{sweep.objective.metric}", value)
        client.set_tag(parent, "cloudburst.sweep.best_trial", best["trial_id"])
        client.set_tag(parent, "cloudburst.sweep.registered", outcome.model_uri)
        log.info(
            "sweep %s: best trial %s (%s) registered as %s",
            sweep.name,
            best["trial_id"],
            selection.reason,
            outcome.model_uri,
        )
    else:
        log.warning("sweep %s: nothing registered: %s", sweep.name, selection.reason)
    client.set_terminated(parent, "FINISHED")
    return outcome
