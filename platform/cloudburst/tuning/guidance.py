"""The guidance sweep: the reconstruction-guidance weight w_r chosen per scenario for one
registered diffusion model, at sampling time, on validation windows.

``jobs/sweep.py --guidance --model models:/NAME@ALIAS`` pins the version, picks the
``windows`` wettest complete windows of its training data's validation split (the training
split when it has none; never the test years), and runs one Tune trial per (scenario, weight):
conditional ensembles of each window through the ensemble engine itself, scored on the
withheld steps against the truth (fair CRPS, MAE, ensemble mean over the observed mean, and
the seam jump across each boundary between known and generated steps over the data's own
step-to-step change), beside the deterministic baseline (linear interpolation between known
steps, persistence of the last one). The weight with the lowest CRPS per scenario is written
to the version as the tag ``guidance_<scenario>``; the engine and the endpoint use it when a
request gives no weight. A parent run in ``cloudburst-sweeps`` holds the table and a figure.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cloudburst import arrow_fs, storage, tracking, versions
from cloudburst.config import StorageConfig
from cloudburst.ensembles.condition import GUIDANCE_TAG
from cloudburst.schema import Strict

__all__ = [
    "GuidanceOutcome",
    "GuidanceSweep",
    "fair_crps",
    "run_guidance_sweep",
    "seam_jump",
    "validation_windows",
]

log = logging.getLogger(__name__)

KINDS = ("interpolation", "forecast")


class GuidanceSweep(Strict):
    """What a guidance sweep runs: weights per scenario on ``windows`` validation windows."""

    model: str
    weights: list[float] = [0.0, 0.3, 1.0, 3.0, 10.0, 100.0, 1e3, 1e6]
    kinds: list[str] = list(KINDS)
    windows: int = 4
    members: int = 4
    steps: int | None = None
    data: str | None = None
    concurrent: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    tracking_uri: str | None = None
    experiment: str = "cloudburst-sweeps"
    storage_path: str = "outputs/ray"
    write_tags: bool = True

    def model_post_init(self, _: Any) -> None:
        bad = [w for w in self.weights if not (math.isfinite(w) and w >= 0)]
        if bad or not self.weights:
            raise ValueError(f"guidance weights must be finite and >= 0 (got {self.weights})")
        unknown = sorted(set(self.kinds) - set(KINDS))
        if unknown or not self.kinds:
            raise ValueError(f"kinds must be among {', '.join(KINDS)} (got {self.kinds})")
        for name, value, low, high in (
            ("windows", self.windows, 1, 100),
            ("members", self.members, 2, 256),
            ("concurrent", self.concurrent, 1, 256),
        ):
            if not low <= value <= high:
                raise ValueError(f"{name} must be in [{low}, {high}] (got {value})")


@dataclass
class GuidanceOutcome:
    version_uri: str
    parent_run_id: str
    rows: list[dict[str, Any]]
    best: dict[str, float] = field(default_factory=dict)


# -------------------------------------------------------------------------------- scores


def fair_crps(members: np.ndarray, truth: np.ndarray) -> float:
    """Mean fair CRPS over pixels: E|X - y| - E|X - X'| / 2 with the m(m-1) estimator;
    ``members`` (m, ...), ``truth`` (...)."""
    m = members.shape[0]
    skill = np.abs(members - truth[None]).mean(axis=0)
    spread = np.abs(members[:, None] - members[None, :]).sum(axis=(0, 1)) / (m * (m - 1))
    return float((skill - 0.5 * spread).mean())


def seam_jump(x: np.ndarray, known: np.ndarray) -> float:
    """Mean |x_t - x_(t-1)| over the steps t where known[t] != known[t-1] (time is the
    third axis from the end of ``x``)."""
    seams = [t for t in range(1, len(known)) if known[t] != known[t - 1]]
    return float(np.mean([np.abs(x[..., t, :, :] - x[..., t - 1, :, :]).mean() for t in seams]))


# ------------------------------------------------------------------------------- windows


def validation_windows(
    data: str, window: tuple[int, int, int], params: dict[str, str], count: int
) -> tuple[list[dict[str, Any]], str]:
    """The ``count`` wettest complete windows of the training run's validation split (its
    training split when it has none), as ensemble conditions, and the part used."""
    from cloudburst.data.calendars import iso
    from cloudburst.data.ingest import PRECIP, open_store
    from cloudburst.data.windows import build_index, split_index
    from cloudburst.evaluation.observations import split_from, window_config

    ds, _ = open_store(data, storage.options_from(data, StorageConfig()))
    index = build_index(ds, window_config(window, params))
    split, _, _ = split_from("val", params)
    part = "val"
    chosen_from = split_index(index, split, "val")
    if len(chosen_from) == 0:
        part = "train"
        chosen_from = split_index(index, split, "train")
    complete = np.flatnonzero(chosen_from.nan_fraction == 0)
    if len(complete) == 0:
        raise ValueError(f"the {part} split of {data} has no complete {window} window")
    keep = complete[
        np.unique(np.linspace(0, len(complete) - 1, min(256, len(complete))).astype(int))
    ]
    t, ny, nx = window
    precip = ds[PRECIP]
    means = []
    for i in keep:
        t0, y0, x0 = (int(v) for v in chosen_from.origins[i])
        means.append(float(precip[t0 : t0 + t, y0 : y0 + ny, x0 : x0 + nx].mean()))
    picked: list[tuple[int, int, int]] = []
    for j in np.argsort(means)[::-1]:
        t0, y0, x0 = (int(v) for v in chosen_from.origins[keep[j]])
        if all(abs(t0 - a) >= t or abs(y0 - b) >= ny or abs(x0 - c) >= nx for a, b, c in picked):
            picked.append((t0, y0, x0))
        if len(picked) == count:
            break
    times = chosen_from.times
    return [{"data": data, "time": iso(times[t0]), "y": y0, "x": x0} for t0, y0, x0 in picked], part


# --------------------------------------------------------------------------------- trial


def score_weight(config: dict[str, Any], spec: dict[str, Any]) -> dict[str, float]:
    """One (scenario, weight): conditional ensembles of every window, scored on the
    withheld steps. Reported to Tune when run as a trial; returned as well."""
    import xarray as xr

    from cloudburst.data.ingest import PRECIP, open_store
    from cloudburst.ensembles.condition import known_steps
    from cloudburst.ensembles.generate import generate, resolve
    from cloudburst.ensembles.request import EnsembleRequest
    from cloudburst.evaluation.conditional import baseline
    from cloudburst.models import registry

    registry.load_plugins(spec.get("model_modules", ()))
    kind, weight = str(config["kind"]), float(config["weight"])
    model = resolve(spec["version_uri"], spec["tracking_uri"])
    window = tuple(model.packaged.window)
    ds, _ = open_store(spec["data"], storage.options_from(spec["data"], StorageConfig()))
    values = ds[PRECIP]
    scores: dict[str, list[float]] = {k: [] for k in ("crps", "mae", "mean", "seam", "baseline")}
    with tempfile.TemporaryDirectory(prefix="cloudburst-guidance-") as tmp:
        for n, condition in enumerate(spec["conditions"]):
            scenario: dict[str, Any] = {"kind": kind, "condition": condition, "guidance": weight}
            if kind == "forecast":
                scenario["context"] = window[0] // 2
            request = EnsembleRequest.model_validate(
                {
                    "model": spec["version_uri"],
                    "members": spec["members"],
                    "seed": n,
                    "batch_size": spec["members"],
                    "output": f"{tmp}/{n}.zarr",
                    "steps": spec["steps"],
                    "scenario": scenario,
                }
            )
            generate(request, model=model)
            gen = xr.open_zarr(request.output, consolidated=False)["precip"].values
            t0 = int(np.flatnonzero(ds.time.values == _time_of(ds, condition["time"]))[0])
            y0, x0 = int(condition["y"]), int(condition["x"])
            truth = values[t0 : t0 + window[0], y0 : y0 + window[1], x0 : x0 + window[2]].values
            known = known_steps(request.scenario, window[0])
            hidden = ~known
            scores["crps"].append(fair_crps(gen[:, hidden], truth[hidden]))
            scores["mae"].append(float(np.abs(gen[:, hidden] - truth[None, hidden]).mean()))
            scores["mean"].append(float(gen[:, hidden].mean() / max(truth[hidden].mean(), 1e-9)))
            scores["seam"].append(seam_jump(gen, known) / max(seam_jump(truth, known), 1e-9))
            base = baseline(truth, known, kind)
            scores["baseline"].append(float(np.abs(base[hidden] - truth[hidden]).mean()))
    out = {k: float(np.mean(v)) for k, v in scores.items()}
    out["skill"] = 1.0 - out["crps"] / out["baseline"] if out["baseline"] > 0 else math.nan
    return out


def _time_of(ds: Any, text: str) -> Any:
    from cloudburst.data.calendars import calendar_of, parse

    return parse(text, calendar_of(ds.time.values))


def guidance_trial(config: dict[str, Any], spec: dict[str, Any]) -> None:
    """The Tune function trainable of one (scenario, weight)."""
    from ray import tune

    tune.report(score_weight(config, spec))


# --------------------------------------------------------------------------------- sweep


def run_guidance_sweep(sweep: GuidanceSweep) -> GuidanceOutcome:
    """Run the guidance sweep; see the module docstring."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from ray import tune

    from cloudburst.evaluation.observations import run_params
    from cloudburst.models import registry
    from cloudburst.models.roles import ConditionalSampler
    from cloudburst.training.job import ensure_ray

    # Tune's results: a local folder, or object storage every node reaches (checked first)
    storage_path, filesystem = arrow_fs.ray_storage(
        sweep.storage_path,
        storage.options_from(sweep.storage_path, StorageConfig()),
        check=True,
    )
    uri = tracking.setup(sweep.tracking_uri, sweep.experiment)
    mlflow.set_registry_uri(uri)
    version_uri, run_id, tags = versions.pin_version(sweep.model, uri)
    packaged = tracking.load_model(version_uri, tracking_uri=uri)
    if not packaged.plays(ConditionalSampler):
        raise ValueError(
            f"{version_uri} ({packaged.name}) does not sample conditionally: a guidance sweep "
            "needs a diffusion model"
        )
    data = sweep.data or tags.get("dataset")
    if not data:
        raise ValueError(f"{version_uri} has no dataset tag; give --data STORE")
    window = tuple(int(n) for n in packaged.window)
    conditions, part = validation_windows(data, window, run_params(run_id, uri), sweep.windows)
    log.info("guidance sweep on %d %s windows of %s", len(conditions), part, data)
    ensure_ray()
    experiment_id = tracking.use_experiment(sweep.experiment)
    client = MlflowClient(uri)
    name = f"guidance-{version_uri[len('models:/') :].replace('/', '-v')}"
    parent = client.create_run(experiment_id, run_name=name, tags={"cloudburst.sweep": name})
    parent_id = parent.info.run_id
    try:
        client.log_dict(parent_id, sweep.model_dump(mode="json"), "sweep.json")
        client.log_dict(parent_id, {"conditions": conditions, "part": part}, "windows.json")
        spec = {
            "version_uri": version_uri,
            "tracking_uri": uri,
            "data": data,
            "conditions": conditions,
            "members": sweep.members,
            "steps": sweep.steps,
            "model_modules": registry.plugin_modules(),
        }
        resources = {"CPU": sweep.cpus_per_trial}
        if sweep.gpus_per_trial > 0:
            resources["GPU"] = sweep.gpus_per_trial
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(guidance_trial, spec=spec), resources),
            param_space={
                "kind": tune.grid_search(list(sweep.kinds)),
                "weight": tune.grid_search(list(sweep.weights)),
            },
            tune_config=tune.TuneConfig(max_concurrent_trials=sweep.concurrent),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_path,
                storage_filesystem=filesystem,
                verbose=1,
            ),
        )
        grid = tuner.fit()
        rows = []
        for result in grid:
            if result.error is not None:
                raise RuntimeError(f"a guidance trial failed: {result.error}")
            m = result.metrics
            rows.append(
                {"kind": result.config["kind"], "weight": float(result.config["weight"])}
                | {k: float(m[k]) for k in ("crps", "mae", "mean", "seam", "baseline", "skill")}
            )
        rows.sort(key=lambda r: (r["kind"], r["weight"]))
        best = {
            kind: min((r for r in rows if r["kind"] == kind), key=lambda r: r["crps"])["weight"]
            for kind in sweep.kinds
        }
        client.log_text(parent_id, _csv(rows), "results.csv")
        for kind, weight in best.items():
            client.log_metric(parent_id, f"best_guidance_{kind}", weight)
        fig = _figure(rows, best, version_uri)
        tracking.log_figure(fig, "figures/guidance.png", run_id=parent_id)
        if sweep.write_tags:
            name_, version = version_uri[len("models:/") :].rsplit("/", 1)
            for kind, weight in best.items():
                client.set_model_version_tag(
                    name_, version, GUIDANCE_TAG.format(kind=kind), f"{weight:g}"
                )
            client.set_model_version_tag(name_, version, "guidance_sweep_run", parent_id)
        client.set_terminated(parent_id, "FINISHED")
    except BaseException:
        client.set_terminated(parent_id, "FAILED")
        raise
    return GuidanceOutcome(version_uri, parent_id, rows, best)


def _csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _figure(rows: list[dict[str, Any]], best: dict[str, float], title: str) -> Any:
    """CRPS against w_r per scenario (log axis, w_r = 0 drawn at the left edge), the
    deterministic baseline's MAE dashed."""
    from cloudburst.evaluation.figures import figure

    fig = figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    positive = [r["weight"] for r in rows if r["weight"] > 0]
    zero_at = min(positive) / 10 if positive else 1.0
    for kind in sorted({r["kind"] for r in rows}):
        mine = [r for r in rows if r["kind"] == kind]
        xs = [r["weight"] if r["weight"] > 0 else zero_at for r in mine]
        line = ax.plot(
            xs,
            [r["crps"] for r in mine],
            marker="o",
            label=f"{kind} (best {best.get(kind, math.nan):g})",
        )
        ax.axhline(mine[0]["baseline"], color=line[0].get_color(), ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("guidance weight w_r (leftmost: 0)")
    ax.set_ylabel("CRPS on the withheld steps")
    ax.set_title(f"{title}: dashed, persistence / linear interpolation MAE", fontsize=9)
    ax.legend(fontsize=8)
    return fig
