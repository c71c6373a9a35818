"""The model registry's versions: a URI pinned to the version it points at now, the
registered models and versions listed with their metrics, and an alias moved (``cloudburst
models list / promote``; the promotion gate is :mod:`cloudburst.evaluation.gate`).

Every function checks the tracking URI first (:func:`cloudburst.tracking.check_tracking`)
where it opens a client, and reports what the registry refuses as
:class:`~cloudburst.tracking.TrackingError` naming what exists.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from cloudburst import environment

# No usage reporting from a training cluster; set before mlflow loads.
environment.apply_defaults(environment.IMPORT)

import mlflow  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from cloudburst import compat  # noqa: E402
from cloudburst.tracking import TrackingError, check_tracking, quote_name, tracking_uri  # noqa: E402

__all__ = ["VAL_LOSS_KEYS", "key_metric", "list_models", "pin", "pin_version", "promote"]

# metrics shown by ``cloudburst models list``, first present wins
VAL_LOSS_KEYS = ("best_val_loss", "val/best_loss", "best/val_loss", "val_loss", "val/loss")


def pin(uri: str, tracking_uri: str | None = None) -> tuple[str, str | None]:
    """(``models:/NAME/VERSION``, run id) that ``uri`` points at now; nothing is loaded."""
    version_uri, run_id, _ = pin_version(uri, tracking_uri)
    return version_uri, run_id


def pin_version(
    uri: str, tracking_uri: str | None = None
) -> tuple[str, str | None, dict[str, str]]:
    """:func:`pin`, with the version's tags (model family, window, units...).

    An alias (``models:/NAME@ALIAS``) is resolved to the version it points at now, so work
    that takes a while keeps using that version whatever the alias does meanwhile.
    """
    body = uri[len("models:/") :] if uri.startswith("models:/") else ""
    if not body:
        raise TrackingError(
            f"model {uri!r} is not a registry URI; use models:/NAME@ALIAS or models:/NAME/VERSION"
        )
    if "@" not in body and "/" not in body:
        raise TrackingError(
            f"model {uri!r} names no version or alias; use models:/{body}@candidate "
            f"or models:/{body}/1"
        )
    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        if "@" in body:
            name, alias = body.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, number = body.rsplit("/", 1)
            mv = client.get_model_version(name, number)
    except MlflowException as exc:
        raise TrackingError(
            f"model {uri} not found in the registry: {exc.message}. `cloudburst models list` "
            "shows the registered models, versions and aliases"
        ) from None
    return f"models:/{mv.name}/{mv.version}", mv.run_id, dict(mv.tags or {})


def _client(uri: str | None) -> tuple[MlflowClient, str]:
    """A client of ``uri``, else of MLflow's current URI if one was set, else the local store."""
    resolved = uri or (_current_uri() if compat.tracking_uri_is_set() else tracking_uri(None))
    check_tracking(resolved)
    return MlflowClient(tracking_uri=resolved, registry_uri=resolved), resolved


def _current_uri() -> str:
    return str(mlflow.get_tracking_uri())


def key_metric(metrics: Mapping[str, float]) -> float | None:
    """The run's validation loss for tables: the first of :data:`VAL_LOSS_KEYS` present."""
    for key in VAL_LOSS_KEYS:
        if key in metrics:
            return float(metrics[key])
    return None


def list_models(uri: str | None = None) -> list[dict[str, Any]]:
    """Registered models of the store at ``uri`` (resolved by :func:`tracking_uri`).

    Each: ``name``, ``description``, ``aliases`` (alias -> version) and ``versions`` (newest
    first): ``version``, ``aliases``, ``tags``, ``run_id``, ``status``, ``created`` (ISO
    time), ``source``, ``metrics`` (the run's latest metrics) and ``val_loss``.
    """
    client, _ = _client(uri)
    out: list[dict[str, Any]] = []
    try:
        registered = list(_paged(client.search_registered_models, max_results=200))
        for rm in sorted(registered, key=lambda r: r.name):
            aliases = {a: str(v) for a, v in sorted((rm.aliases or {}).items())}
            versions = []
            found = _paged(
                client.search_model_versions, f"name='{quote_name(rm.name)}'", max_results=200
            )
            for mv in sorted(found, key=lambda v: int(v.version), reverse=True):
                metrics = _run_metrics(client, mv.run_id)
                versions.append(
                    {
                        "version": str(mv.version),
                        "aliases": sorted(
                            set(mv.aliases or [])
                            | {a for a, v in aliases.items() if v == str(mv.version)}
                        ),
                        "tags": dict(mv.tags or {}),
                        "run_id": mv.run_id,
                        "status": mv.status,
                        "created": _iso(mv.creation_timestamp),
                        "source": mv.source,
                        "metrics": metrics,
                        "val_loss": key_metric(metrics),
                    }
                )
            out.append(
                {
                    "name": rm.name,
                    "description": rm.description or "",
                    "aliases": aliases,
                    "versions": versions,
                }
            )
    except MlflowException as exc:
        raise TrackingError(f"cannot list registered models: {exc.message}") from None
    return out


def _paged(search: Any, *args: Any, max_results: int) -> Iterator[Any]:
    token = None
    while True:
        page = search(*args, max_results=max_results, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _run_metrics(client: MlflowClient, run_id: str | None) -> dict[str, float]:
    if not run_id:
        return {}
    try:
        return dict(client.get_run(run_id).data.metrics)
    except MlflowException:
        return {}  # the run was deleted; the version stays listable


def _iso(ms: int | None) -> str:
    if not ms:
        return ""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="seconds")


def promote(
    name: str, version: str | int, alias: str = "champion", *, tracking_uri: str | None = None
) -> dict[str, Any]:
    """Point ``alias`` of model ``name`` at ``version`` (moving it from where it was).

    Returns ``{"name", "version", "alias", "previous"}`` (previous: the version the alias
    pointed at, or None). Unknown model or version: :class:`TrackingError` naming what exists.
    """
    client, uri = _client(tracking_uri)
    version = str(version)
    if not version.isdigit():
        raise TrackingError(f"a model version is a number, got {version!r}")
    try:
        rm = client.get_registered_model(name)
    except MlflowException:
        known = sorted(r.name for r in _paged(client.search_registered_models, max_results=200))
        raise TrackingError(
            f"no registered model {name!r} in {uri}; registered: {', '.join(known) or 'none'}"
        ) from None
    versions = sorted(
        (
            str(v.version)
            for v in _paged(
                client.search_model_versions, f"name='{quote_name(name)}'", max_results=200
            )
        ),
        key=int,
    )
    if version not in versions:
        raise TrackingError(
            f"model {name!r} has no version {version}; versions: {', '.join(versions) or 'none'}"
        )
    previous = (rm.aliases or {}).get(alias)
    try:
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as exc:
        raise TrackingError(f"cannot set alias {alias!r} of {name!r}: {exc.message}") from None
    return {
        "name": name,
        "version": version,
        "alias": alias,
        "previous": str(previous) if previous is not None else None,
    }
