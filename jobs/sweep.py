"""Sweep a training config's hyperparameters with Ray Tune; register the best trial's model.

    python jobs/sweep.py --config jobs/configs/sweep-vae-demo.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/sweep.py --config CONFIG
    python jobs/sweep.py --resume NAME [--storage-path outputs/ray]   # after the driver died
    python jobs/sweep.py --guidance --model models:/NAME@ALIAS [--weights 0 1 100 1e6 ...]

Each trial runs the training job's own code at one point of the search space (a child MLflow
run under the sweep's parent run, experiment cloudburst-sweeps). Trials are ranked on the
sweep's objective (a tail metric in physical units among trials whose mean bias stays within
its bound); the best is registered with alias ``candidate``. Ends with the results table, the
line ``model: models:/NAME/VERSION`` and the parent MLflow run id.

With ``--guidance``, the sweep is over the reconstruction-guidance weight of a registered
diffusion model at sampling time (cloudburst.tuning.guidance): interpolation and forecast
ensembles on validation windows through the ensemble engine, one trial per (scenario,
weight), scored by CRPS on the withheld steps beside persistence / linear interpolation; the
best weight per scenario is tagged on the version and used when a request gives none.
"""

from __future__ import annotations

import argparse
import sys

from _common import setup_logging, take_verbose, validation_lines
from cloudburst.config import ConfigError, load_config
from cloudburst.training.job import PREFLIGHT_ERRORS
from cloudburst.tuning.config import SweepConfig
from cloudburst.tuning.sweep import SweepError, SweepOutcome, resume_sweep, run_sweep

COLUMNS = ("trial_id", "status", "epochs")


def summary(outcome: SweepOutcome, metric: str, bias: str | None) -> str:
    """The results table: one line per trial, the best marked with *."""
    params = [k for k in outcome.rows[0] if k.startswith("param:")] if outcome.rows else []
    cols = [*COLUMNS, *params, metric, *([bias] if bias else [])]
    best = outcome.selection.best["trial_id"] if outcome.selection.best else None
    lines = ["  " + "  ".join(f"{c.removeprefix('param:'):>14}" for c in cols)]
    for row in outcome.rows:
        cells = []
        for c in cols:
            v = row.get(c, "")
            cells.append(f"{v:>14.4g}" if isinstance(v, float) else f"{str(v)[-14:]:>14}")
        lines.append(("* " if row["trial_id"] == best else "  ") + "  ".join(cells))
    return "\n".join(lines)


def holdout_table(rows: list[dict], metric: str, bias: str | None) -> str:
    """The front's trials with their test-split scores of the objective and bias metrics."""
    params = [k for k in rows[0] if k.startswith("param:")]
    cols = ["trial_id", *params] + [
        "test_" + m.removeprefix("val_") for m in (metric, bias) if m is not None
    ]
    lines = ["  " + "  ".join(f"{c.removeprefix('param:'):>14}" for c in cols)]
    for row in rows:
        cells = [row.get(c, "") for c in cols]
        lines.append(
            "  "
            + "  ".join(
                f"{v:>14.4g}" if isinstance(v, float) else f"{str(v)[-14:]:>14}" for v in cells
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv, verbose = take_verbose(argv)
    setup_logging(verbose)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a sweep config (jobs/configs/sweep-*.yaml)")
    parser.add_argument("--resume", metavar="NAME", help="continue the sweep NAME")
    parser.add_argument(
        "--storage-path", default="outputs/ray", help="where --resume finds the sweep"
    )
    guidance = parser.add_argument_group("guidance sweep (--guidance)")
    guidance.add_argument("--guidance", action="store_true", help="sweep w_r of --model")
    guidance.add_argument("--model", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    guidance.add_argument("--weights", type=float, nargs="+")
    guidance.add_argument("--kinds", nargs="+", choices=["interpolation", "forecast"])
    guidance.add_argument("--windows", type=int, help="validation windows (default 4)")
    guidance.add_argument("--members", type=int, help="members per window (default 4)")
    guidance.add_argument("--steps", type=int, help="sampler steps (default: the model's)")
    guidance.add_argument("--data", help="the store (default: the version's dataset tag)")
    guidance.add_argument("--concurrent", type=int, help="trials at once (default 2)")
    guidance.add_argument("--tracking-uri")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.guidance:
        return guidance_main(args, parser)
    if bool(args.config) == bool(args.resume):
        parser.error("give either --config (a new sweep) or --resume NAME")
    try:
        if args.resume:
            outcome = resume_sweep(args.resume, args.storage_path)
        else:
            outcome = run_sweep(load_config(SweepConfig, args.config, args.overrides))
    except (ConfigError, SweepError, *PREFLIGHT_ERRORS) as exc:
        print(f"sweep: error: {exc}", file=sys.stderr)
        return 2
    objective = outcome.sweep.objective
    print(summary(outcome, objective.metric, objective.bias_metric))
    print(f"selection: {outcome.selection.reason}")
    if outcome.holdout:
        print("the Pareto front and the best trial on the test split (held out from selection):")
        print(holdout_table(outcome.holdout, objective.metric, objective.bias_metric))
    print(f"model: {outcome.model_uri or 'none registered'}")
    print(f"run: {outcome.parent_run_id}")
    return 0 if outcome.model_uri else 1


def guidance_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from pydantic import ValidationError

    from cloudburst.tracking import TrackingError
    from cloudburst.tuning.guidance import GuidanceSweep, run_guidance_sweep

    if not args.model:
        parser.error("--guidance needs --model models:/NAME@ALIAS")
    fields = {
        k: getattr(args, k)
        for k in ("weights", "kinds", "windows", "members", "steps", "data", "concurrent")
        if getattr(args, k) is not None
    }
    try:
        sweep = GuidanceSweep(
            model=args.model,
            tracking_uri=args.tracking_uri,
            storage_path=args.storage_path,
            **fields,
        )
        outcome = run_guidance_sweep(sweep)
    except ValidationError as exc:
        print(
            f"sweep: error: invalid guidance sweep:\n{validation_lines(exc, '--')}", file=sys.stderr
        )
        return 2
    except (ValueError, TrackingError, *PREFLIGHT_ERRORS) as exc:
        print(f"sweep: error: {exc}", file=sys.stderr)
        return 2
    print(f"{'scenario':<14}{'w_r':>8}{'CRPS':>9}{'MAE':>9}{'mean/obs':>10}", end="")
    print(f"{'seam/obs':>10}{'baseline MAE':>14}{'skill':>8}")
    for row in outcome.rows:
        mark = "*" if outcome.best.get(row["kind"]) == row["weight"] else " "
        print(
            f"{row['kind']:<13}{mark}{row['weight']:>8g}{row['crps']:>9.4f}{row['mae']:>9.4f}"
            f"{row['mean']:>10.2f}{row['seam']:>10.2f}{row['baseline']:>14.4f}"
            f"{row['skill']:>8.2f}"
        )
    print("(* best CRPS per scenario; skill: 1 - CRPS / baseline MAE, > 0 beats the baseline)")
    for kind, weight in outcome.best.items():
        print(f"guidance_{kind}: {weight:g}")
    print(f"model: {outcome.version_uri}")
    print(f"run: {outcome.parent_run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
