"""One trial of a sweep: the training job's own code at one point of the search space.

:func:`run_trial` is the Tune function trainable. It builds the trial's training config (the
base config, already checked by the driver, with the point's values set), opens the trial's
MLflow run nested under the sweep's parent run (the same run again when a resumed sweep
restarts the trial), trains through :func:`cloudburst.training.job.fit` with Tune's
``TuneReportCallback`` in the trainer, so every epoch's report reaches the scheduler, logs the
packaged model into the trial's run (registered only if the trial wins) and reports the metrics
of the packaged checkpoint's epoch once more with ``finished = 1``.

The trial reserves only a little memory for itself: its CPUs and GPUs are those of the
training workers it starts (the driver checks that ``concurrent`` trials fit the cluster).
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

from cloudburst import tracking
from cloudburst.config import TrainJobConfig, validate
from cloudburst.models import registry

__all__ = [
    "FINISHED",
    "MODEL_TAG",
    "SWEEP_TAG",
    "TRIAL_MEMORY",
    "TRIAL_TAG",
    "run_trial",
    "set_dotted",
    "trial_config",
]

log = logging.getLogger(__name__)

SWEEP_TAG = "cloudburst.sweep"
TRIAL_TAG = "cloudburst.sweep.trial"
MODEL_TAG = "cloudburst.sweep.model_uri"
FINISHED = "finished"
TRIAL_MEMORY = 64 * 1024 * 1024  # bytes reserved by a trial's own process


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """``tree[a][b][c] = value`` for ``a.b.c`` (sections created where missing)."""
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[keys[-1]] = copy.deepcopy(value)


def trial_config(
    base: dict[str, Any], point: dict[str, Any], *, name: str | None = None
) -> TrainJobConfig:
    """The training config of a trial: ``base`` (a config tree) with ``point``'s values,
    validated (:class:`cloudburst.schema.ConfigError` naming the field otherwise)."""
    tree = copy.deepcopy(base)
    for key, value in point.items():
        set_dotted(tree, key, value)
    if name is not None:
        set_dotted(tree, "run.name", name)
    source = f"trial point {json.dumps(point, default=str)}"
    return validate(TrainJobConfig, tree, source)


def _existing_run(client: Any, experiment_id: str, parent: str, trial: str) -> str | None:
    """The run a previous attempt of this trial opened (a resumed sweep), if any."""
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TRIAL_TAG}` = '{trial}' and tags.`mlflow.parentRunId` = '{parent}'",
        max_results=1,
    )
    return found[0].info.run_id if found else None


def run_trial(config: dict[str, Any], spec: dict[str, Any]) -> None:
    """The Tune function trainable (see the module docstring).

    ``config``: the trial's point, keyed by the space's dotted keys; ``spec``: what every
    trial shares (``base`` config tree, ``sweep`` name, ``parent_run_id``, ``experiment_id``,
    ``tracking_uri``, ``model_modules``), put in by the driver with ``tune.with_parameters``.
    """
    import mlflow
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cloudburst.training.job import check, fit

    registry.load_plugins(spec.get("model_modules", ()))
    trial = tune.get_context().get_trial_id()
    point = {key: config[key] for key in spec["keys"]}
    cfg = trial_config(spec["base"], point, name=f"{spec['sweep']}-{trial}")
    cfg, sizes, uri = check(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri)
    parent = spec["parent_run_id"]
    previous = _existing_run(client, spec["experiment_id"], parent, trial)
    mlflow.set_experiment(experiment_id=spec["experiment_id"])  # the sweep's, not the base's
    with mlflow.start_run(
        run_id=previous,
        run_name=None if previous else cfg.run.name,
        parent_run_id=parent,
        tags=None if previous else {SWEEP_TAG: spec["sweep"], TRIAL_TAG: trial},
    ) as run:
        mlflow.log_params({f"sweep.{k}": json.dumps(v) for k, v in point.items()})
        fitted = fit(cfg, sizes, uri, run_id=run.info.run_id, callbacks=[TuneReportCallback()])
        model_uri = tracking.log_model(fitted.packaged, run_id=run.info.run_id)
        mlflow.set_tag(MODEL_TAG, model_uri)
        mlflow.log_metrics({f"packaged_{k}": v for k, v in fitted.metrics.items()})
    log.info("trial %s finished: model %s", trial, model_uri)
    tune.report({**fitted.metrics, FINISHED: 1.0})
