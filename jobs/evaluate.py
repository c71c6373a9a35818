"""Evaluate registered models and ensemble stores against a data split, into metrics and
figures logged to MLflow.

    python jobs/evaluate.py --model models:/cloudburst-vae-fraser@candidate \\
        --data outputs/fraser/precip.zarr --split test --out outputs/evaluation/fraser
    python jobs/evaluate.py --model models:/A@champion --model models:/B@candidate \\
        --ensemble s3://bucket/ens.zarr --data s3://bucket/precip.zarr --split test@seasons:5

``--split PART`` uses the split the (first) model was trained with; ``PART@SCHEME`` sets one.
Writes OUT/metrics.json and OUT/figures/*.png; ends with the line ``evaluation: OUT``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from pydantic import ValidationError

import _common  # also puts the package on sys.path when run from a checkout
from cloudburst.evaluation.request import EvaluationRequest


def _finite(text: str) -> float:
    """A finite number (argparse type): ``nan`` and ``inf`` are refused with the flag named."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, e.g. 64 (got {text!r})")
    return value


def model_uri_problem(uri: str) -> str | None:
    """Why ``uri`` is not a registry URI (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``)."""
    body = uri.removeprefix("models:/") if uri.startswith("models:/") else ""
    if not body:
        return (
            f"--model {uri!r} is not a registry URI; use models:/NAME@ALIAS or models:/NAME/VERSION"
        )
    if "@" not in body and "/" not in body:
        return (
            f"--model {uri!r} names no version or alias; use models:/{body}@candidate "
            f"or models:/{body}/1"
        )
    return None


def parse(argv: list[str] | None) -> tuple[dict, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=[], help="models:/NAME@ALIAS (repeat)")
    p.add_argument("--ensemble", action="append", default=[], help="ensemble store (repeat)")
    p.add_argument("--data", required=True, help="Cloudburst store of observations")
    p.add_argument("--split", default="test", help="PART[@SCHEME] (default: test)")
    p.add_argument("--out", default="outputs/evaluation")
    p.add_argument("--limit", type=int, help="observed windows (evenly spread; default 2000)")
    p.add_argument("--samples", type=int, help="generated windows per model (default 2000)")
    p.add_argument("--members", type=int, help="conditional members per window (default 16)")
    p.add_argument("--seed", type=int)
    p.add_argument("--chunk-mb", type=_finite, help="memory per verification tile (default 64)")
    p.add_argument("--endpoint-url", help="object-store endpoint (S3/GCS emulators, MinIO)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    p.add_argument("--experiment", help="MLflow experiment (default: cloudburst-evaluation)")
    p.add_argument("--no-mlflow", action="store_true", help="write files only")
    args = p.parse_args(argv)
    tree: dict = {
        "models": args.model,
        "ensembles": args.ensemble,
        "data": args.data,
        "split": args.split,
        "out": args.out,
        "log_to_mlflow": not args.no_mlflow,
    }
    for key in ("limit", "samples", "members", "seed", "chunk_mb", "experiment"):
        if getattr(args, key) is not None:
            tree[key] = getattr(args, key)
    if args.endpoint_url:
        tree["storage"] = {"endpoint_url": args.endpoint_url}
    return tree, args


def main(argv: list[str] | None = None) -> int:
    argv, verbose = _common.take_verbose(argv)
    _common.setup_logging(verbose)
    _common.refuse_nul(argv, "evaluate")
    tree, args = parse(argv)
    try:
        request = EvaluationRequest.model_validate(tree)
    except ValidationError as exc:
        print(
            "evaluate: error: bad arguments\n" + _common.validation_lines(exc, "--"),
            file=sys.stderr,
        )
        return 2
    problems = [p for p in map(model_uri_problem, request.models) if p]
    if not request.models and not request.ensembles:
        problems.append(
            "nothing to evaluate: give at least one --model models:/NAME@ALIAS or --ensemble STORE"
        )
    if problems:  # before MLflow or any store is touched
        print("evaluate: error: " + "; ".join(problems), file=sys.stderr)
        return 2
    # MLflow and the evaluation engine load only for a request that validates
    from cloudburst import storage, tracking
    from cloudburst.ensembles.store import EnsembleStoreError
    from cloudburst.evaluation.evaluate import EvaluationError, evaluate

    try:
        uri = tracking.setup(args.tracking_uri, request.experiment)
        result = evaluate(request, tracking_uri=uri, progress=lambda m: print(f"evaluate: {m}"))
    except (
        EvaluationError,
        EnsembleStoreError,
        storage.StorageError,
        tracking.TrackingError,
    ) as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    summary = {
        e["label"]: {k: v for k, v in e["metrics"].items() if "bin_" not in k}
        for e in result.report["models"]
    }
    print(json.dumps(summary, indent=1))
    if result.run_id:
        print(f"evaluate: MLflow run {result.run_id} ({len(result.figures)} figures)")
    print(f"evaluation: {result.metrics_path.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
