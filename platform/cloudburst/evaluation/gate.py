"""The promotion gate: a version takes an alias only if it is no worse than the version there.

``cloudburst models promote NAME VERSION --alias champion`` goes through
:func:`promote_gated`: when the alias already points at a version of ``NAME``, the candidate
and that holder are evaluated together by the evaluation engine
(:func:`cloudburst.evaluation.evaluate.evaluate`: one request, both pinned version URIs, the
same observed windows of the same split and the same seed for both, logged to MLflow with its
figures), then compared on the gate metrics of the candidate's model family
(:data:`cloudburst.evaluation.gate_rules.GATE_METRICS`). The candidate is refused when it is
worse than the holder beyond the tolerance on any of them;
:func:`versions.promote <cloudburst.versions.promote>` moves the alias only when it passes, or
when forced with a reason.

The data: the store the candidate was trained on (its version tag ``dataset``), unless given.
The split: ``test`` by default, which is the candidate's training run's split (see
:class:`~cloudburst.evaluation.request.EvaluationRequest`); ``PART@SCHEME`` sets one.

Every gated promotion is recorded as tags of the candidate version (:data:`TAGS`): the
verdict (``passed``, ``refused``, ``forced``, ``no-champion``), the evaluation run, the
version it was compared with and the comparison; a forced one also its reason.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cloudburst import tracking, versions
from cloudburst.config import StorageConfig
from cloudburst.data.ingest import StoreError
from cloudburst.evaluation.evaluate import evaluate
from cloudburst.evaluation.gate_rules import (
    GateMetric,
    GateVerdict,
    compare,
    gate_metrics,
)
from cloudburst.evaluation.request import EvaluationError, EvaluationRequest
from cloudburst.storage import StorageError

__all__ = ["TAGS", "GateError", "gate", "promote_gated"]

log = logging.getLogger(__name__)


TAG_VALUE_LIMIT = 5000  # older MLflow servers cap model version tag values at 5,000 chars
TAGS = (
    "gate.verdict",
    "gate.alias",
    "gate.champion_version",
    "gate.evaluation_run_id",
    "gate.evaluation_out",
    "gate.comparison",
    "gate.forced",
    "gate.reason",
    "gate.refusal",
)


class GateError(ValueError):
    """The promotion cannot be gated as asked; the message says what to do."""


# The comparison could not be made (what --force may override): the evaluation cannot run
# (no dataset tag, different windows, an empty split), a model or the store cannot be read.
NOT_COMPARABLE: tuple[type[Exception], ...] = (
    EvaluationError,
    tracking.TrackingError,
    StoreError,
    StorageError,
    OSError,
)


# --------------------------------------------------------------------------------- the gate


def gate(
    name: str,
    version: str | int,
    alias: str = "champion",
    *,
    tracking_uri: str | None = None,
    data: str | None = None,
    split: str = "test",
    samples: int = 256,
    limit: int = 256,
    members: int = 8,
    seed: int = 0,
    out: str | Path | None = None,
    experiment: str = "cloudburst-evaluation",
    storage: StorageConfig | None = None,
    metrics: Sequence[GateMetric] | None = None,
) -> GateVerdict:
    """Compare ``version`` of ``name`` with the version ``alias`` points at; moves nothing.

    No holder: status ``no-champion``; the holder is ``version``: ``same``; else one
    evaluation of both (``samples`` generated windows each, ``limit`` observed windows,
    ``members`` posterior draws) and status ``passed`` or ``refused``. ``metrics``: the
    gate metrics, by default the candidate family's (:func:`gate_metrics`).

    Raises :class:`~cloudburst.tracking.TrackingError` for an unknown model or version
    (naming what exists), :class:`GateError` for bad settings and
    :class:`~cloudburst.evaluation.request.EvaluationError` when the two cannot be evaluated
    (no ``dataset`` tag and no ``data``, different windows, an empty split...).
    """
    _check_settings(samples, limit, members)
    uri, client = _registry(tracking_uri)
    version, holder, tags = _resolve(client, uri, name, version, alias)
    return _compare(
        client,
        uri,
        name,
        version,
        alias,
        holder,
        tags,
        data=data,
        split=split,
        samples=samples,
        limit=limit,
        members=members,
        seed=seed,
        out=out,
        experiment=experiment,
        storage=storage,
        metrics=metrics,
    )


def promote_gated(
    name: str,
    version: str | int,
    alias: str = "champion",
    *,
    force: bool = False,
    reason: str | None = None,
    tracking_uri: str | None = None,
    data: str | None = None,
    split: str = "test",
    samples: int = 256,
    limit: int = 256,
    members: int = 8,
    seed: int = 0,
    out: str | Path | None = None,
    experiment: str = "cloudburst-evaluation",
    storage: StorageConfig | None = None,
    metrics: Sequence[GateMetric] | None = None,
) -> GateVerdict:
    """:func:`gate`, then point ``alias`` at ``version`` if it passed, had no holder to beat,
    or ``force`` (with a ``reason``, required) overrides a refusal or a failed comparison.

    Records the verdict as tags of the version (:data:`TAGS`), refusals included; returns the
    verdict with ``promoted`` set (False when refused, or when the alias already pointed at
    ``version``).
    """
    reason = (reason or "").strip() or None
    if force and reason is None:
        raise GateError(
            "--force needs --reason TEXT: say why the gate is overridden (it is recorded on "
            "the model version)"
        )
    _check_settings(samples, limit, members)
    uri, client = _registry(tracking_uri)
    version, holder, tags = _resolve(client, uri, name, version, alias)
    if holder == version:
        log.debug("%s@%s already points at version %s; nothing to do", name, alias, version)
        return GateVerdict(name, version, alias, holder, True, "same")
    try:
        verdict = _compare(
            client,
            uri,
            name,
            version,
            alias,
            holder,
            tags,
            data=data,
            split=split,
            samples=samples,
            limit=limit,
            members=members,
            seed=seed,
            out=out,
            experiment=experiment,
            storage=storage,
            metrics=metrics,
        )
    except NOT_COMPARABLE as exc:
        message = " ".join(str(exc).split()).rstrip(".")
        if not force:
            raise GateError(
                f"the gate cannot compare version {version} of {name} with version {holder} "
                f"({alias}): {message}. To promote it without the comparison: cloudburst "
                f"models promote {name} {version} --alias {alias} --force --reason TEXT"
            ) from None
        log.warning("the gate could not compare: %s; promoting anyway (--force)", message)
        verdict = GateVerdict(name, version, alias, holder, False, "refused", error=message)
    verdict.reason = reason
    now = _resolve(client, uri, name, version, alias)[1]
    if now != holder:
        raise GateError(
            f"{name}@{alias} moved from version {holder} to {now} while the gate was "
            "evaluating; nothing was promoted, run the promotion again"
        )
    if not verdict.passed and force:
        verdict.status = "forced"
    if verdict.passed or force:
        versions.promote(name, version, alias, tracking_uri=uri)
        verdict.promoted = True
        log.debug("%s@%s -> version %s (%s)", name, alias, version, verdict.status)
    else:
        log.debug("version %s of %s refused as %s@%s", version, name, name, alias)
    _record(client, verdict)
    return verdict


# ------------------------------------------------------------------------------ internals


def _check_settings(samples: int, limit: int, members: int) -> None:
    problems = []
    if samples < 10:
        problems.append(f"--samples must be at least 10 (got {samples})")
    if limit < 1:
        problems.append(f"--limit must be at least 1 (got {limit})")
    if members < 2:
        problems.append(f"--members must be at least 2 (got {members})")
    if problems:
        raise GateError("; ".join(problems))


def _registry(configured: str | None) -> tuple[str, Any]:
    """(tracking URI, a client of its tracking store and registry): ``configured``, else
    MLflow's current URI if one was set, else the local store (as ``versions.promote``)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from cloudburst import compat

    if configured:
        uri = tracking.tracking_uri(configured)
    elif compat.tracking_uri_is_set():
        uri = str(mlflow.get_tracking_uri())
    else:
        uri = tracking.tracking_uri(None)
    tracking.check_tracking(uri)
    return uri, MlflowClient(tracking_uri=uri, registry_uri=uri)


def _resolve(
    client: Any, uri: str, name: str, version: str | int, alias: str
) -> tuple[str, str | None, dict[str, str]]:
    """(version, the version ``alias`` points at or None, the version's tags); unknown model
    or version: TrackingError naming what exists."""
    from mlflow.exceptions import MlflowException

    version = str(version)
    if not version.isdigit():
        raise tracking.TrackingError(f"a model version is a number, got {version!r}")
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        known = sorted(r.name for r in client.search_registered_models(max_results=200))
        raise tracking.TrackingError(
            f"no registered model {name!r} in {uri}; registered: {', '.join(known) or 'none'}"
        ) from None
    try:
        mv = client.get_model_version(name, version)
    except MlflowException:
        quoted = name.replace("'", "\\'")
        versions = sorted(
            (str(v.version) for v in client.search_model_versions(f"name='{quoted}'")), key=int
        )
        raise tracking.TrackingError(
            f"model {name!r} has no version {version}; versions: {', '.join(versions) or 'none'}"
        ) from None
    holder = (registered.aliases or {}).get(alias)
    return version, (str(holder) if holder is not None else None), dict(mv.tags or {})


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "model"


def _compare(
    client: Any,
    uri: str,
    name: str,
    version: str,
    alias: str,
    holder: str | None,
    tags: Mapping[str, str],
    *,
    data: str | None,
    split: str,
    samples: int,
    limit: int,
    members: int,
    seed: int,
    out: str | Path | None,
    experiment: str,
    storage: StorageConfig | None,
    metrics: Sequence[GateMetric] | None,
) -> GateVerdict:
    if holder is None:
        log.debug("%s@%s points at no version: nothing to compare with", name, alias)
        return GateVerdict(name, version, alias, None, True, "no-champion")
    if holder == version:
        return GateVerdict(name, version, alias, holder, True, "same")
    store = data or tags.get("dataset")
    if not store:
        raise EvaluationError(
            f"version {version} of {name} has no `dataset` tag naming the store it was "
            "trained on; give the store to evaluate on with --data"
        )
    notes = []
    held_store = client.get_model_version(name, holder).tags.get("dataset")
    if held_store and held_store != store:
        notes.append(f"version {holder} was trained on {held_store}; both are evaluated on {store}")
    folder = (
        Path(out)
        if out is not None
        else Path("outputs/promotion-gate") / f"{_safe(name)}-v{version}-vs-v{holder}"
    )
    candidate_uri, champion_uri = f"models:/{name}/{version}", f"models:/{name}/{holder}"
    request = EvaluationRequest(
        models=[candidate_uri, champion_uri],  # the first's training run gives the split
        data=store,
        split=split,
        out=str(folder),
        limit=limit,
        samples=samples,
        members=members,
        seed=seed,
        bootstrap=10,  # return-level intervals are not gated
        storage=storage or StorageConfig(),
        experiment=experiment,
        run_name=f"promotion gate {name} v{version} vs {alias} v{holder}",
        log_to_mlflow=True,
    )
    log.info(
        "gate: evaluating %s against %s (%s) on %s, split %s",
        candidate_uri,
        champion_uri,
        alias,
        store,
        split,
    )
    tracking.setup(uri, experiment)
    result = evaluate(request, tracking_uri=uri, progress=log.info)
    entries = {e.get("version_uri"): e for e in result.report["models"]}
    cand, held = entries[candidate_uri], entries[champion_uri]
    family = cand.get("model")
    if held.get("model") != family:
        notes.append(f"version {holder} is a {held.get('model')} model, the candidate a {family}")
    rows = compare(cand["metrics"], held["metrics"], metrics or gate_metrics(family))
    compared = [r for r in rows if r.passed is not None]
    passed = bool(compared) and all(r.passed for r in compared)
    verdict = GateVerdict(
        name,
        version,
        alias,
        holder,
        passed,
        "passed" if passed else "refused",
        rows=rows,
        run_id=result.run_id,
        out=result.metrics_path.parent.resolve(),
        family=family,
        data=store,
        split=result.report["data"]["split"],
        notes=notes,
    )
    for line in verdict.lines():
        log.debug("%s", line)
    return verdict


def _record(client: Any, verdict: GateVerdict) -> None:
    """The verdict as tags of the candidate version; gate tags of an earlier verdict that
    this one does not set are removed."""
    from mlflow.exceptions import MlflowException

    tags: dict[str, str] = {"gate.verdict": verdict.status, "gate.alias": verdict.alias}
    if verdict.champion is not None:
        tags["gate.champion_version"] = verdict.champion
        tags["gate.comparison"] = verdict.comparison_json()
    if verdict.run_id:
        tags["gate.evaluation_run_id"] = verdict.run_id
    if verdict.out is not None:
        tags["gate.evaluation_out"] = str(verdict.out)
    if verdict.status == "forced":
        tags["gate.forced"] = "true"
        tags["gate.refusal"] = verdict.refusal(advice=False)
    if verdict.reason:
        tags["gate.reason"] = verdict.reason
    try:
        current = client.get_model_version(verdict.name, verdict.version).tags or {}
        for key in TAGS:
            if key in current and key not in tags:
                client.delete_model_version_tag(verdict.name, verdict.version, key)
        for key, value in tags.items():
            client.set_model_version_tag(
                verdict.name, verdict.version, key, value[:TAG_VALUE_LIMIT]
            )
    except MlflowException as exc:
        raise tracking.TrackingError(
            f"cannot tag version {verdict.version} of {verdict.name} with the gate's verdict: "
            f"{exc.message}"
        ) from None
