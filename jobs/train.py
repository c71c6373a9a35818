"""Train a model with Ray Train, track it in MLflow and register it.

    python jobs/train.py --config jobs/configs/vae-demo.yaml            # in-process Ray
    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/vae-chirps.yaml

Re-running with the same run.name resumes from the last checkpoint in run.storage_path.
Ends with the line ``model: models:/NAME/VERSION`` and the MLflow run id.
"""

from __future__ import annotations

import sys

from _common import load_job_config, setup_logging, take_verbose
from cloudburst.config import TrainJobConfig


def main(argv: list[str] | None = None) -> int:
    argv, verbose = take_verbose(argv)
    setup_logging(verbose)
    cfg = load_job_config(TrainJobConfig, argv, __doc__.splitlines()[0], "train")
    # Ray and MLflow load only for a config that validates
    from cloudburst.evaluation.report import train_and_evaluate
    from cloudburst.training.job import PREFLIGHT_ERRORS, check

    try:
        cfg, sizes, uri = check(cfg)
    except PREFLIGHT_ERRORS as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"train: {sizes['train_windows']} train / {sizes['val_windows']} val windows; "
        f"tracking {uri}"
    )
    outcome = train_and_evaluate(cfg, sizes, uri)
    print(f"model: {outcome.model_uri}")
    print(f"run: {outcome.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
