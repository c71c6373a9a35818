"""Science check: does the quantized loss reconstruct heavy rain better?

Table 3 of the quantized-loss study (Szwarcman et al., Quantizing reconstruction losses for
improving weather data synthesis), checked on this platform.

    .venv/bin/python benchmarks/vae_losses.py [--config jobs/configs/vae-fraser.yaml]
        [--variants rec rec+wqt rec@100] [--limit 12000] [--skip-training] [KEY=VALUE ...]

Trains one VAE per variant with the training job itself (Ray Train, MLflow, registry: run
names ``<run.name>-<variant>``, registered models ``<run.registered_model>-<variant>``), then
scores each registered model on the TEST split (``--limit`` windows evenly spread over it) in
physical units: quantized MSE in the top 5 / top 10 non-empty bins of the store's histogram,
the 0.99 / 0.999 quantiles of inputs against reconstructions, and active latent units. Prints
one table with each variant's ratio to plain ``rec``, and logs the table and a figure of
quantized MSE per bin (all variants on one axis) to an MLflow run ``vae-losses``.

A variant is ``LOSS`` or ``LOSS@REC_WEIGHT``: ``rec@100`` is the fair control, plain MSE
weighted so that reconstruction and the MMD regulariser are of similar scale. Ingest the data
first (``python jobs/ingest.py --config jobs/configs/fraser.yaml``). ``--skip-training``
scores the models already registered. Cost on 2 CPU cores with the default config: about 20
minutes of training per variant.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from _common import ROOT  # before cloudburst: package path, quiet defaults
from cloudburst import tracking
from cloudburst.config import TrainJobConfig, load_config
from cloudburst.data.ingest import StoreStats
from cloudburst.data.samples import split_windows
from cloudburst.evaluation import figures
from cloudburst.evaluation.report import train_and_evaluate
from cloudburst.models.scoring import Reconstruction, reconstruction_scores
from cloudburst.training.job import check

DEFAULT_VARIANTS = ("rec", "rec+wqt", "rec@100")


def variant_overrides(variant: str, cfg: TrainJobConfig) -> list[str]:
    loss, _, weight = variant.partition("@")
    slug = variant.replace("+", "-").replace("@", "-w")
    out = [
        f"model.loss={loss}",
        f"model.rec_weight={weight or 1}",
        f"run.name={cfg.run.name}-{slug}",
        f"run.registered_model={cfg.run.registered_model}-{slug}",
    ]
    return out


def score(uri: str, cfg: TrainJobConfig, limit: int) -> tuple[Reconstruction, StoreStats]:
    packaged = tracking.load_model(uri)
    data = split_windows(cfg, packaged.transform, limit, part="test")
    edges = torch.tensor(data["stats"].histogram_edges, dtype=torch.float64)
    rec = reconstruction_scores(
        packaged.model.cpu(), data["x"], data["mask"], packaged.transform, edges, prefix="test_"
    )
    rec.metrics["test_windows"] = float(data["x"].shape[0])
    return rec, data["stats"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "jobs/configs/vae-fraser.yaml"))
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--limit", type=int, default=12000)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()

    base = load_config(TrainJobConfig, args.config, args.overrides)
    results: dict[str, dict[str, float]] = {}
    curves, counts, edges, units = {}, {}, None, ""
    for variant in args.variants:
        cfg = load_config(
            TrainJobConfig, args.config, [*args.overrides, *variant_overrides(variant, base)]
        )
        cfg, sizes, uri = check(cfg)
        if args.skip_training:
            model_uri = f"models:/{cfg.run.registered_model}@candidate"
        else:
            print(f"== {variant}: training {cfg.run.name}", flush=True)
            model_uri = train_and_evaluate(cfg, sizes, uri).model_uri
        rec, stats = score(model_uri, cfg, args.limit)
        metrics = rec.metrics
        results[variant] = metrics
        curves[variant], counts[variant] = rec.mse, rec.counts
        edges, units = stats.histogram_edges, stats.units
        print(
            f"   {variant}: {json.dumps({k: v for k, v in metrics.items() if 'bin' not in k})}",
            flush=True,
        )

    ref = results.get("rec")
    rows = [
        ("test qMSE top 5 bins", "test_qmse_top5", True),
        ("test qMSE top 10 bins", "test_qmse_top10", True),
        ("0.99 quantile recon", "test_q0.99_recon", False),
        ("0.999 quantile recon", "test_q0.999_recon", False),
        ("active units", "test_active_units", False),
    ]
    first = next(iter(results.values()))
    print(f"\ntest split, {int(first['test_windows'])} windows; units {units}")
    print(
        f"inputs: 0.99 quantile {first['test_q0.99_input']:.2f}, "
        f"0.999 quantile {first['test_q0.999_input']:.2f}"
    )
    header = f"{'':24}" + "".join(f"{v:>16}" for v in results)
    print(header)
    for label, key, ratio in rows:
        line = f"{label:24}" + "".join(f"{r[key]:>16.4g}" for r in results.values())
        print(line)
        if ratio and ref:
            print(
                f"{'  ratio to rec':24}"
                + "".join(f"{r[key] / ref[key]:>16.3f}" for r in results.values())
            )

    import mlflow

    tracking.setup(base.run.tracking_uri, base.run.experiment)
    with mlflow.start_run(run_name="vae-losses"):
        mlflow.log_dict({"config": args.config, "results": results}, "vae_losses.json")
        fig = figures.quantized_mse_per_bin(edges, curves, counts, units=units)
        tracking.log_figure(fig, "figures/quantized_mse_test.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
