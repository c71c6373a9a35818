"""Every call Cloudburst makes into a third-party library's private API, one function each.

Private names change without notice between releases. Keeping them here, each behind a small
documented function, means a version bump is checked in one place: ``tests/test_compat.py``
asserts, on the installed packages, that every name used below still exists and behaves as
relied on, and fails when a pinned version changes it.

- :func:`tracking_uri_is_set`: MLflow, ``mlflow.tracking._tracking_service.utils``;
- :func:`finish_system_monitor`: MLflow's ``SystemMetricsMonitor`` internals;
- :func:`replace_model_field`: pydantic v2's ``__pydantic_fields__`` of a model class.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def tracking_uri_is_set() -> bool:
    """Whether MLflow's process-wide tracking URI was set (``mlflow.set_tracking_uri`` or
    ``MLFLOW_TRACKING_URI``) rather than left to MLflow's default."""
    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

    return bool(is_tracking_uri_set())


def finish_system_monitor(monitor: Any) -> None:
    """Stop an MLflow ``SystemMetricsMonitor``, record one last sample and flush it.

    ``monitor.finish()`` alone stops the sampler without a last sample, so a run shorter than
    one sampling interval gets no point. Here: the sampler thread is told to stop
    (``_shutdown_event``) and joined (``_process``), one sample is collected and published,
    then the monitor is finished. Failures are logged as warnings; this never raises
    (monitoring must never stop training).
    """
    try:
        monitor._shutdown_event.set()
        if monitor._process is not None:
            monitor._process.join()
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
    except Exception as exc:  # noqa: BLE001 - monitoring must never stop training
        log.warning("last system metrics sample not logged: %r", exc)
    try:
        monitor.finish()
    except Exception as exc:  # noqa: BLE001
        log.warning("system metrics monitor did not finish cleanly: %r", exc)


def replace_model_field(
    model_cls: type[Any], name: str, annotation: Any, default_factory: Callable[[], Any]
) -> None:
    """Give the pydantic v2 model ``model_cls`` a new annotation for its field ``name`` (with
    ``default_factory``) and rebuild its validator, in place.

    Used to widen a discriminated union once more members are registered. Models that embed
    ``model_cls`` as a field keep their own validators: rebuild those too if they must see it.
    """
    from pydantic import Field
    from pydantic.fields import FieldInfo

    model_cls.__pydantic_fields__[name] = FieldInfo.from_annotated_attribute(
        annotation, Field(default_factory=default_factory)
    )
    model_cls.model_rebuild(force=True)
