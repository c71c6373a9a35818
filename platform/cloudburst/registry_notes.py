"""What a user browsing the MLflow registry reads: the descriptions of models and versions.

A registered model's description says what its family is and does
(:attr:`cloudburst.models.registry.ModelFamily.description`); it is set when the model is
created, or later while it is empty (a user's own text is never replaced).

A version's description is Markdown made of marked sections, each between
``<!-- cloudburst:KEY -->`` and ``<!-- /cloudburst:KEY -->`` (HTML comments: the UI does not
show them):

- ``registration``: the data (store, variables, split, windows) and the training (epochs,
  loss, settings, run link ``runs:/ID``), from the version's tags and its run's params and
  metrics, written by :func:`describe_registration` when the version is registered;
- ``evaluation``: the evaluation after training (:func:`record_evaluation`): its split, the
  key metrics as a table and its figures as artifact paths;
- ``evaluate:DATA:SPLIT``: an evaluation published by ``jobs/evaluate.py`` or the promotion
  gate (:func:`record_published_evaluation`), one section per data and split;
- ``sweep``: what a sweep chose and why (:func:`record_sweep`).

Writing a section replaces the section of that key and keeps everything else, a user's own
text outside the markers included; the whole stays within MLflow's 5,000 characters (the
longest section is cut first). The gate metrics of the version's family
(:func:`cloudburst.evaluation.gate_rules.gate_metrics`) become version tags ``metric.NAME``
whenever an evaluation knows them, with ``metric_source`` saying which evaluation.

The functions that write to MLflow never raise: a failure is logged as a warning, and a
registration or an evaluation goes on as if nothing was written.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ParamSpec

from cloudburst import environment

# No usage reporting from a training cluster; set before mlflow loads.
environment.apply_defaults(environment.IMPORT)

from mlflow.tracking import MlflowClient  # noqa: E402

from cloudburst.evaluation.gate_rules import gate_metrics, metric_value  # noqa: E402
from cloudburst.models import registry  # noqa: E402

__all__ = [
    "DESCRIPTION_LIMIT",
    "describe_registration",
    "evaluation_section",
    "family_text",
    "gate_tags",
    "metrics_table",
    "model_description",
    "parse_sections",
    "record_evaluation",
    "record_published_evaluation",
    "record_sweep",
    "registration_section",
    "set_section",
]

log = logging.getLogger(__name__)

P = ParamSpec("P")

DESCRIPTION_LIMIT = 5000  # MLflow's SQL stores keep 5,000 characters of a description
TABLE_ROWS = 20
FIGURES_LISTED = 16
CUT_NOTE = "\n\n_(cut to fit the 5,000 characters MLflow keeps)_"
# version tags every package has (PrecipitationModel.tags) or that other parts set; the rest
# of a version's tags are its family's settings (loss, bins, latent...)
COMMON_TAGS = {
    "model",
    "window",
    "transform",
    "units",
    "input",
    "target",
    "dry_threshold",
    "stats_scope",
    "dataset",
    "metric_source",
}
OTHER_TAG_PREFIXES = ("metric.", "gate.", "sweep", "mlflow.")

_SECTION = re.compile(
    r"<!-- cloudburst:(?P<key>[^\s>]+) -->\n?(?P<body>.*?)\n?<!-- /cloudburst:(?P=key) -->",
    re.DOTALL,
)


def _quietly(what: str) -> Callable[[Callable[P, None]], Callable[P, None]]:
    """Log a warning instead of raising: a description never fails its caller."""

    def wrap(fn: Callable[P, None]) -> Callable[P, None]:
        @functools.wraps(fn)
        def call(*args: P.args, **kwargs: P.kwargs) -> None:
            try:
                fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - a description is never worth a failure
                log.warning("could not write the registry description (%s): %r", what, exc)

        return call

    return wrap


# ------------------------------------------------------------------------------- texts


def family_text(family: str | None) -> str:
    """The description of model family ``family`` (its registry entry's), or a line naming it."""
    if not family:
        return "A cloudburst model of an unknown family (its versions have no `model` tag)."
    try:
        text = registry.family(family).description
    except ValueError:
        text = None
    return (text or f"A cloudburst `{family}` model.").strip()


def model_description(family: str | None) -> str:
    """A registered model's description: its family's text and where to look further."""
    return (
        f"{family_text(family)}\n\n"
        f"Model family: `{family or 'unknown'}`. Each version's description says what data it "
        "was trained on, how, and how it scored; its tags hold the window, units and settings, "
        "and `metric.NAME` the promotion gate's metrics once an evaluation has them. Aliases: "
        "`candidate` (newly registered), `champion` (promoted through the gate)."
    )


def _number(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(v):
        return "NaN"
    return f"{v:.6g}"


def metrics_table(metrics: Mapping[str, Any], first: Sequence[str] = ()) -> str:
    """A Markdown table ``| metric | value |`` of finite metrics: ``first`` (those present),
    then the rest by name, per-bin scores left out, :data:`TABLE_ROWS` rows at most."""
    finite = {
        str(k): float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and math.isfinite(float(v)) and "_bin_" not in str(k)
    }
    names = [n for n in first if n in finite]
    names += sorted(n for n in finite if n not in names)
    rows = [f"| `{n}` | {_number(finite[n])} |" for n in names[:TABLE_ROWS]]
    if not rows:
        return "_no finite metrics_"
    more = len(names) - len(rows)
    tail = [f"\n_{more} more in the run_"] if more > 0 else []
    return "\n".join(["| metric | value |", "|---|---|", *rows, *tail])


def _figures_list(run_id: str, paths: Iterable[str]) -> str:
    listed = sorted(dict.fromkeys(str(p).strip("/") for p in paths))
    if not listed:
        return ""
    shown = [f"- `runs:/{run_id}/{p}`" for p in listed[:FIGURES_LISTED]]
    if len(listed) > FIGURES_LISTED:
        shown.append(f"- … {len(listed) - FIGURES_LISTED} more under `runs:/{run_id}/figures`")
    return "Figures (artifact paths):\n\n" + "\n".join(shown)


def _split_text(params: Mapping[str, str], tags: Mapping[str, str]) -> str | None:
    split = {
        k[len("data.split.") :]: v
        for k, v in params.items()
        if k.startswith("data.split.") and v not in ("None", "", "[]")
    }
    parts = []
    if split:
        scheme = split.pop("scheme", None)
        settings = ", ".join(f"{k} {v}" for k, v in sorted(split.items()))
        parts.append(f"scheme `{scheme}`" + (f" ({settings})" if settings else ""))
    scope = params.get("stats_scope") or tags.get("stats_scope")
    if scope:
        parts.append(f"statistics of the {scope}")
    return "; ".join(parts) or None


def _windows_text(params: Mapping[str, str], tags: Mapping[str, str]) -> str | None:
    length, size = params.get("data.windows.length"), params.get("data.windows.size")
    if length and size:
        text = f"{length} time steps × {size} × {size} pixels"
        extra = [
            f"{label} {params[key]}"
            for key, label in (
                ("data.windows.stride", "stride"),
                ("data.windows.time_stride", "time stride"),
                ("data.windows.doy", "days of year"),
            )
            if params.get(key) not in (None, "None")
        ]
        if extra:
            text += f" ({', '.join(extra)})"
    elif tags.get("window"):
        text = f"{tags['window']} (time × y × x)"
    else:
        return None
    counts = [
        f"{params[key]} {label}"
        for key, label in (("train_windows", "training"), ("val_windows", "validation"))
        if params.get(key)
    ]
    if counts:
        text += f"; {', '.join(counts)} windows"
    return text


def registration_section(
    name: str,
    version: str,
    tags: Mapping[str, str],
    *,
    run_id: str | None,
    params: Mapping[str, str] | None = None,
    metrics: Mapping[str, float] | None = None,
    epochs_run: int | None = None,
    source: str | None = None,
) -> str:
    """The ``registration`` section of a version: its data and its training (Markdown)."""
    params, metrics = params or {}, metrics or {}
    family = tags.get("model")
    lines = [f"**{name}** version {version}: a `{family or 'unknown'}` model."]
    lines += ["", "#### Data", ""]
    store = params.get("data.store") or tags.get("dataset")
    lines.append(f"- store: `{store}`" if store else "- store: not recorded")
    source_var = tags.get("input") or params.get("data.input")
    target_var = tags.get("target") or params.get("data.target")
    if target_var and target_var != "None":
        lines.append(f"- variables: `{source_var}` (input) → `{target_var}` (target)")
    elif source_var and source_var != "None":
        lines.append(f"- variable: `{source_var}`")
    else:
        lines.append("- variable: the store's (single) variable")
    split = _split_text(params, tags)
    if split:
        lines.append(f"- split: {split}")
    windows = _windows_text(params, tags)
    if windows:
        lines.append(f"- windows: {windows}")
    physical = [
        f"{label} {tags[key]}"
        for key, label in (
            ("units", "units"),
            ("transform", "transform"),
            ("dry_threshold", "dry threshold"),
        )
        if tags.get(key)
    ]
    if physical:
        lines.append(f"- {', '.join(physical)}")

    lines += ["", "#### Training", ""]
    epochs = params.get("train.epochs")
    if epochs_run is not None or epochs:
        text = (
            f"{epochs_run} epoch{'s' if epochs_run != 1 else ''} run"
            if epochs_run is not None
            else "epochs run: unknown"
        )
        if epochs:
            text += f" of at most {epochs}"
        if params.get("train.patience"):
            text += f" (early stopping, patience {params['train.patience']})"
        steps = params.get("train.max_steps_per_epoch")
        if steps and steps != "None":
            text += f", at most {steps} steps per epoch"
        lines.append(f"- {text}")
    loss = tags.get("loss") or params.get("model.loss")
    lines.append(f"- loss: `{loss}`" if loss else f"- loss: the `{family}` family's objective")
    settings = {
        k: v
        for k, v in sorted(tags.items())
        if k not in COMMON_TAGS and k != "loss" and not k.startswith(OTHER_TAG_PREFIXES)
    }
    if settings:
        lines.append("- settings: " + ", ".join(f"{k} `{v}`" for k, v in settings.items()))
    losses = [
        f"{label} {_number(metrics[key])}"
        for key, label in (
            ("best_val_loss", "best validation loss"),
            ("val_loss", "last validation loss"),
            ("train_loss", "last training loss"),
        )
        if key in metrics
    ]
    if losses:
        lines.append(f"- {', '.join(losses)}")
    if run_id:
        lines.append(f"- run: `runs:/{run_id}`")
    if source:
        lines.append(f"- logged model: `{source}`")
    return "\n".join(lines)


def evaluation_section(
    title: str,
    metrics: Mapping[str, Any],
    *,
    run_id: str,
    figures: Iterable[str] = (),
    where: str | None = None,
    first: Sequence[str] = (),
) -> str:
    """An evaluation section: a title, where it ran, its metrics table, its figures."""
    lines = [f"#### {title}", ""]
    lines.append(f"{where}; run `runs:/{run_id}`." if where else f"Run `runs:/{run_id}`.")
    lines += ["", metrics_table(metrics, first)]
    listed = _figures_list(run_id, figures)
    if listed:
        lines += ["", listed]
    return "\n".join(lines)


def gate_tags(family: str | None, metrics: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``metric.NAME`` tags of the family's gate metrics known in ``metrics`` (as ``NAME`` or
    ``prefix + NAME``, e.g. ``eval_qmse_top5``), finite values only."""
    names = {str(k)[len(prefix) :]: v for k, v in metrics.items() if str(k).startswith(prefix)}
    found = {**metrics, **names} if prefix else dict(metrics)
    out = {}
    for rule in gate_metrics(family):
        value = metric_value(found, rule.name)
        if value is not None:
            out[f"metric.{rule.name}"] = f"{value:.6g}"
    return out


# ---------------------------------------------------------------------------- sections


def parse_sections(text: str | None) -> dict[str, str]:
    """The marked sections of a description: key -> body."""
    return {m["key"]: m["body"] for m in _SECTION.finditer(text or "")}


def _block(key: str, body: str) -> str:
    return f"<!-- cloudburst:{key} -->\n{body.strip()}\n<!-- /cloudburst:{key} -->"


def set_section(text: str | None, key: str, body: str, limit: int = DESCRIPTION_LIMIT) -> str:
    """``text`` with its section ``key`` replaced by ``body`` (appended if absent), the rest
    kept; the longest sections are cut until the whole fits ``limit`` characters."""
    text = (text or "").strip()
    block = _block(key, body)
    if key in parse_sections(text):
        text = _SECTION.sub(lambda m: block if m["key"] == key else m[0], text)
    else:
        text = f"{text}\n\n{block}" if text else block
    return _fit(text, limit)


def _fit(text: str, limit: int) -> str:
    for _ in range(len(parse_sections(text)) + 1):
        over = len(text) - limit
        if over <= 0:
            return text
        bodies = parse_sections(text)
        if not bodies:
            break
        key = max(bodies, key=lambda k: len(bodies[k]))
        body = bodies[key]
        keep = max(0, len(body) - over - len(CUT_NOTE))
        cut = body[:keep].rsplit("\n", 1)[0] if "\n" in body[:keep] else body[:keep]
        shorter = _block(key, cut.rstrip() + CUT_NOTE)
        text = _SECTION.sub(lambda m, k=key, b=shorter: b if m["key"] == k else m[0], text)
    return text[:limit]


# ------------------------------------------------------------------------------ MLflow


def _write_section(
    client: MlflowClient, name: str, version: str, key: str, body: str
) -> dict[str, str]:
    """Replace section ``key`` of a version's description; returns the version's tags."""
    mv = client.get_model_version(name, version)
    text = set_section(mv.description, key, body)
    if text != (mv.description or ""):
        client.update_model_version(name, version, description=text)
    return dict(mv.tags or {})


def _set_tags(client: MlflowClient, name: str, version: str, tags: Mapping[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def _epochs_run(client: MlflowClient, run_id: str, metrics: Mapping[str, float]) -> int | None:
    if "val_loss" not in metrics:
        return None
    history = client.get_metric_history(run_id, "val_loss")
    return max((int(m.step) for m in history), default=-1) + 1 or None


@_quietly("registration")
def describe_registration(name: str, version: str, *, client: MlflowClient | None = None) -> None:
    """Describe a just registered version (section ``registration``) from its tags and its
    run, and its registered model from the family when that description is empty."""
    client = client or MlflowClient()
    mv = client.get_model_version(name, str(version))
    tags = dict(mv.tags or {})
    family = tags.get("model")
    rm = client.get_registered_model(name)
    if not (rm.description or "").strip():
        client.update_registered_model(name, description=model_description(family))
    params: dict[str, str] = {}
    metrics: dict[str, float] = {}
    epochs = None
    if mv.run_id:
        run = client.get_run(mv.run_id)
        params, metrics = dict(run.data.params), dict(run.data.metrics)
        epochs = _epochs_run(client, mv.run_id, metrics)
    body = registration_section(
        name,
        str(mv.version),
        tags,
        run_id=mv.run_id,
        params=params,
        metrics=metrics,
        epochs_run=epochs,
        source=mv.source,
    )
    _write_section(client, name, str(mv.version), "registration", body)


@_quietly("evaluation after training")
def record_evaluation(
    name: str,
    version: str,
    run_id: str,
    metrics: Mapping[str, float],
    *,
    client: MlflowClient | None = None,
) -> None:
    """Add the evaluation after training (metrics ``eval_*`` logged to ``run_id``, figures
    under its ``figures/``) to a version's description (section ``evaluation``); its gate
    metrics known there become ``metric.NAME`` tags."""
    client = client or MlflowClient()
    run = client.get_run(run_id)
    split = run.data.tags.get("evaluation_split")
    figures = [
        a.path for a in client.list_artifacts(run_id, "figures") if not getattr(a, "is_dir", False)
    ]
    for text_artifact in ("translation.md",):
        if any(a.path == text_artifact for a in client.list_artifacts(run_id)):
            figures.append(text_artifact)
    mv = client.get_model_version(name, str(version))
    family = (mv.tags or {}).get("model")
    gate = gate_tags(family, metrics, prefix="eval_")
    first = [f"eval_{t[len('metric.') :]}" for t in gate]
    body = evaluation_section(
        "Evaluation after training",
        metrics,
        run_id=run_id,
        figures=figures,
        where=f"On the {split}" if split else None,
        first=first,
    )
    _write_section(client, name, str(version), "evaluation", body)
    if gate:
        where = f", {split}" if split else ""
        _set_tags(
            client,
            name,
            str(version),
            {**gate, "metric_source": f"evaluation after training (run {run_id}{where})"},
        )


@_quietly("published evaluation")
def record_published_evaluation(
    version_uri: str,
    *,
    run_id: str,
    label: str,
    metrics: Mapping[str, Any],
    data: str,
    split: str,
    figures: Iterable[str] = (),
    family: str | None = None,
    others: Sequence[str] = (),
    client: MlflowClient | None = None,
) -> None:
    """Add an evaluation published to MLflow (``jobs/evaluate.py``, the promotion gate) to the
    description of the version ``version_uri`` (``models:/NAME/VERSION``; section
    ``evaluate:DATA:SPLIT``, replaced by a later evaluation on the same data and split); its
    gate metrics become ``metric.NAME`` tags. ``figures``: artifact paths in ``run_id``;
    ``others``: the other sources evaluated beside it."""
    body_of_uri = version_uri[len("models:/") :] if version_uri.startswith("models:/") else ""
    name, _, version = body_of_uri.rpartition("/")
    if not name or not version.isdigit():
        log.debug("not a registry version URI, no description written: %s", version_uri)
        return
    client = client or MlflowClient()
    if family is None:
        family = (client.get_model_version(name, version).tags or {}).get("model")
    gate = gate_tags(family, metrics)
    where = f"`{label}` on `{data}` ({split})"
    if others:
        where += " beside " + ", ".join(f"`{o}`" for o in others)
    body = evaluation_section(
        f"Evaluation on {data}",
        metrics,
        run_id=run_id,
        figures=figures,
        where=where[0].upper() + where[1:],
        first=[rule.name for rule in gate_metrics(family)],
    )
    key = "evaluate:" + re.sub(r"[^A-Za-z0-9_.:@/-]+", "_", f"{data}:{split}")[:200]
    _write_section(client, name, version, key, body)
    if gate:
        _set_tags(
            client,
            name,
            version,
            {**gate, "metric_source": f"evaluation run {run_id} on {data} ({split})"[:5000]},
        )


@_quietly("sweep")
def record_sweep(
    name: str,
    version: str,
    *,
    sweep: str,
    parent_run_id: str,
    trial: str,
    chosen: Mapping[str, Any] | None = None,
    objective: str,
    mode: str,
    value: float,
    reason: str,
    trials: Mapping[str, int] | None = None,
    figures: Iterable[str] = (),
    client: MlflowClient | None = None,
) -> None:
    """Add what sweep ``sweep`` chose and why to the description of the version it
    registered (section ``sweep``): the trial, its point of the space (``chosen``), its
    objective value, the selection's reason, the trial counts and the sweep's figures."""
    client = client or MlflowClient()
    goal = "lowest" if mode == "min" else "highest"
    lines = [
        f"#### Chosen by the sweep `{sweep}`",
        "",
        f"- trial `{trial}`: `{objective}` = {_number(value)} ({goal} is best)",
        f"- why: {reason}",
    ]
    if chosen:
        lines.append(
            "- its point of the space: " + ", ".join(f"`{k}` = `{v}`" for k, v in chosen.items())
        )
    if trials:
        lines.append("- trials: " + ", ".join(f"{n} {status}" for status, n in trials.items()))
    lines.append(
        f"- sweep run: `runs:/{parent_run_id}` (its results table `results.csv`, the Pareto "
        "front `pareto.json` and the test-split scores `holdout.csv` when scored)"
    )
    listed = _figures_list(parent_run_id, figures)
    if listed:
        lines += ["", listed]
    _write_section(client, name, str(version), "sweep", "\n".join(lines))
