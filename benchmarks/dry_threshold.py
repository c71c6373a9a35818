"""Dry threshold: a model's ensembles without and with it, beside the observed.

    .venv/bin/python benchmarks/dry_threshold.py [--config CONFIG] [--skip-training]
        [--members 32] [--windows 4] [--forecast-members 8] [--steps 25] [KEY=VALUE ...]

(CONFIG: jobs/configs/diffusion-radolan.yaml by default; ingest first with ``python
jobs/ingest.py --config jobs/configs/radolan.yaml``.)

Trains the configured model with the training job itself (``train.dry_threshold: auto``, so
the package carries the threshold chosen on the training split), then draws the same
ensembles twice through the ensemble engine, once with the package's threshold switched off
and once with it: an unconditional store of ``--members`` members and, for a model that
samples conditionally, forecast stores of ``--forecast-members`` members on the
``--windows`` wettest windows of the store. One evaluation (``cloudburst.evaluation``) scores
all the stores against the observed windows, and the table sets the two side by side with
the observed: wet fraction, share of pixels in the low end (0, 1], mean wet- and dry-spell
lengths, the climatological CRPS and rank-0 share of the unconditional stores, and the CRPS,
rank-0 share and skill against persistence of the forecasts.

For a diffusion model with the learnt input transformation, the masking set's lower bound
(model space, next to -1) is also taken back to physical units, h^-1(low) times the scale, to
compare with the chosen threshold: values below it are the ones the transformation was not
trained to resolve. Cost on 2 CPU cores with the default config: about 10 minutes of
training, about 10 of sampling and scoring.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable

import mlflow
import numpy as np
import torch
from guidance import wettest_windows

from _common import ROOT  # before cloudburst: package path, quiet defaults
from cloudburst import tracking
from cloudburst.config import TrainJobConfig, load_config
from cloudburst.data.ingest import open_store
from cloudburst.ensembles.generate import generate, resolve
from cloudburst.ensembles.request import EnsembleRequest
from cloudburst.evaluation.evaluate import EvaluationRequest, evaluate
from cloudburst.evaluation.report import train_and_evaluate
from cloudburst.models.diffusion import DiffusionModel
from cloudburst.models.roles import ConditionalSampler, TransformedInput
from cloudburst.training.job import check

PLAIN_ROWS = (
    ("wet fraction", "wet_fraction", "observed_wet_fraction"),
    ("low-end share (0, 1]", "low_end_fraction", "observed_low_end_fraction"),
    ("mean wet spell (steps)", "mean_wet_spell", "observed_mean_wet_spell"),
    ("mean dry spell (steps)", "mean_dry_spell", "observed_mean_dry_spell"),
    ("CRPS, climatological", "clim_crps", None),
)
FORECAST_ROWS = (
    ("CRPS", "cond_crps"),
    ("skill vs persistence", "cond_crps_skill"),
)


def masking_floor(resolved) -> float | None:  # noqa: ANN001
    """The learnt transformation's masking lower bound in physical units (None otherwise)."""
    packaged = resolved.packaged
    if not packaged.plays(TransformedInput):
        return None
    net = packaged.network(TransformedInput)
    if not isinstance(net, DiffusionModel) or net.cfg.transform != "learnt":
        return None
    with torch.no_grad():
        u = net.from_model_space(torch.tensor([float(net.cfg.masking[0])], dtype=torch.float64))
    return float(np.asarray(packaged.transform.inverse(u.numpy()))[0])


def num(value: float | None) -> float:
    """A metric of the report (JSON null, e.g. a mean spell with no spell, is NaN)."""
    return float("nan") if value is None else float(value)


def rank0(entry: dict, key: str) -> float:
    hist = entry.get("curves", {}).get(key)
    return float(hist[0]) if hist else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "jobs/configs/diffusion-radolan.yaml"))
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--members", type=int, default=32)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--forecast-members", type=int, default=8)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--limit", type=int, default=400)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args()

    cfg = load_config(TrainJobConfig, args.config, [*args.overrides, "train.dry_threshold=auto"])
    cfg, sizes, uri = check(cfg)
    if not args.skip_training:
        print(f"== training {cfg.run.name}", flush=True)
        train_and_evaluate(cfg, sizes, uri)
    model_uri = f"models:/{cfg.run.registered_model}@candidate"
    tracking_uri = tracking.setup(cfg.run.tracking_uri, "cloudburst-evaluation")
    resolved = resolve(model_uri, tracking_uri)
    chosen = resolved.packaged.dry_threshold
    run = mlflow.MlflowClient(tracking_uri).get_run(resolved.run_id)
    limit = run.data.metrics.get("dry_threshold_detection_limit", float("nan"))
    floor = masking_floor(resolved)
    window = tuple(resolved.packaged.window)
    conditional = resolved.packaged.plays(ConditionalSampler)
    data = cfg.data.store
    ds, _ = open_store(data)
    starts = wettest_windows(data, window, args.windows) if conditional else []

    settings = {"without": None, "with": chosen}
    stores: dict[str, dict[str, list[str]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, threshold in settings.items():
            resolved.packaged.dry_threshold = threshold
            plain = f"{tmp}/{name}-plain.zarr"
            request = {"model": model_uri, "seed": 0, "steps": args.steps, "batch_size": 8}
            generate(
                EnsembleRequest.model_validate(
                    request | {"members": args.members, "output": plain}
                ),
                model=resolved,
            )
            forecasts = []
            for n, (i, y, x) in enumerate(starts):
                time_iso = str(np.datetime_as_string(ds.time.values[i], unit="m"))
                out = f"{tmp}/{name}-forecast-{n}.zarr"
                scenario = {
                    "kind": "forecast",
                    "context": window[0] // 2,
                    "condition": {"data": data, "time": time_iso, "y": y, "x": x},
                }
                generate(
                    EnsembleRequest.model_validate(
                        request
                        | {
                            "seed": n,
                            "members": args.forecast_members,
                            "output": out,
                            "scenario": scenario,
                        }
                    ),
                    model=resolved,
                )
                forecasts.append(out)
            stores[name] = {"plain": [plain], "forecast": forecasts}
            print(f"  stores {name} the dry threshold written", flush=True)

        split = "train@none" if cfg.data.split.scheme == "none" else "test"
        every = [u for s in stores.values() for kind in ("plain", "forecast") for u in s[kind]]
        result = evaluate(
            EvaluationRequest(
                ensembles=every,
                data=data,
                split=split,
                out=str(ROOT / "outputs" / "evaluation" / f"{cfg.run.name}-dry"),
                limit=args.limit,
                samples=max(args.members, 10),
                batch_size=4,
                run_name=f"{cfg.run.name}: dry threshold",
            ),
            tracking_uri=tracking_uri,
            progress=lambda m: print(m, flush=True),
        )
    entries = {e["url"]: e for e in result.report["models"]}

    print(
        f"\n{resolved.version_uri}: dry threshold {chosen:.4g} {resolved.packaged.units} ", end=""
    )
    print(f"(detection limit of the data {limit:.4g})", end="")
    if floor is not None:
        print(f"; learnt transformation's masking bound {floor:.4g} {resolved.packaged.units}")
    else:
        print()
    print(f"\n{'unconditional, ' + str(args.members) + ' members':32}", end="")
    print(f"{'without':>10}{'with':>10}{'observed':>10}")
    plain = {k: entries[v["plain"][0]] for k, v in stores.items()}
    for label, key, observed in PLAIN_ROWS:
        row = [num(plain[k]["metrics"].get(key)) for k in settings]
        obs = num(plain["with"]["metrics"].get(observed)) if observed else float("nan")
        print(f"{label:32}" + "".join(f"{v:>10.4g}" for v in [*row, obs]))
    row = [rank0(plain[k], "clim_rank_histogram") for k in settings]
    print(f"{'rank-0 share, climatological':32}" + "".join(f"{v:>10.4g}" for v in row), end="")
    print(f"{1 / (args.members + 1):>10.4g}  (flat)")
    if starts:

        def mean_over(name: str, score: Callable[[dict], float]) -> float:
            return float(np.mean([score(entries[u]) for u in stores[name]["forecast"]]))

        print(f"\nforecasts, {len(starts)} windows x {args.forecast_members} members")
        for label, key in FORECAST_ROWS:
            row = [mean_over(k, lambda e, key=key: num(e["metrics"].get(key))) for k in settings]
            print(f"{label:32}" + "".join(f"{v:>10.4g}" for v in row))
        row = [mean_over(k, lambda e: rank0(e, "cond_rank_histogram")) for k in settings]
        print(f"{'rank-0 share':32}" + "".join(f"{v:>10.4g}" for v in row), end="")
        print(f"{1 / (args.forecast_members + 1):>10.4g}  (flat)")
    print(f"\nfigures and metrics.json: {result.metrics_path.parent}; MLflow run {result.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
