"""Sweep a training config's hyperparameters with Ray Tune; register the best trial's model.

    python jobs/sweep.py --config jobs/configs/sweep-vae-demo.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/sweep.py --config CONFIG
    python jobs/sweep.py --resume NAME [--storage-path outputs/ray]   # after the driver died

Each trial runs the training job's own code at one point of the search space (a child MLflow
run under the sweep's parent run, experiment cloudburst-sweeps). Trials are ranked on the
sweep's objective (a tail metric in physical units among trials whose mean bias stays within
its bound); the best is registered with alias ``candidate``. Ends with the results table, the
line ``model: models:/NAME/VERSION`` and the parent MLflow run id.
"""

from __future__ import annotations

import argparse
import sys

from _common import setup_logging
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


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a sweep config (jobs/configs/sweep-*.yaml)")
    parser.add_argument("--resume", metavar="NAME", help="continue the sweep NAME")
    parser.add_argument(
        "--storage-path", default="outputs/ray", help="where --resume finds the sweep"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
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
    print(f"model: {outcome.model_uri or 'none registered'}")
    print(f"run: {outcome.parent_run_id}")
    return 0 if outcome.model_uri else 1


if __name__ == "__main__":
    sys.exit(main())
