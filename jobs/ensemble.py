"""Generate an ensemble from a registered model into a Zarr store (local, s3://, gs://).

    python jobs/ensemble.py --model models:/cloudburst-vae-demo@candidate --members 1000 \\
        --seed 1 --output outputs/ensembles/demo.zarr
    python jobs/ensemble.py --model models:/NAME@champion --members 100000 --seed 7 \\
        --output s3://bucket/ens.zarr --scenario extreme --threshold-quantile 0.99
    python jobs/ensemble.py --model models:/cloudburst-diffusion-radolan@candidate \
        --members 64 --output outputs/ensembles/forecast.zarr --scenario forecast \
        --condition-data outputs/radolan/precip.zarr --condition-time 2022-10-18T06:50 \
        --condition-y 80 --condition-x 80 --context 4
    ray job submit --working-dir . -- python jobs/ensemble.py --request request.yaml --workers 8

Where the members are made (``--workers``): ``auto`` (the default) fans the member chunks out
over the Ray cluster when there is one (``RAY_ADDRESS`` is set, as under ``ray job submit``),
one worker per GPU it offers, else per CPU, and runs in this process otherwise; ``local``
always runs in this process; a number N fans out over N Ray workers (starting a local Ray
when no cluster is given). Every way writes the same bytes (on one kind of device).

Scenarios: unconditional and extreme (both families); interpolation, forecast and extension
(diffusion models, conditioned on a window of an ingested store, extension to ``--length``
steps). Extreme draws are steered by ``--proposal shift|tail`` and carry importance weights;
a conditional scenario takes the same proposals (``--scenario forecast --proposal shift``:
weighted extreme versions of the next steps given the observed ones).

Re-running the same request finishes an interrupted one (only missing chunks are written);
a complete one is left as it is. Ends with the line ``ensemble: URL``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pydantic import ValidationError

import _common  # also puts the package on sys.path when run from a checkout
from cloudburst import storage, tracking
from cloudburst.config import ConfigError, read_tree
from cloudburst.ensembles.generate import EnsembleError, generate
from cloudburst.ensembles.request import EnsembleRequest
from cloudburst.ensembles.store import EnsembleStoreError


def parse(argv: list[str] | None) -> tuple[dict, str | None]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--request", help="YAML/JSON file of a whole request (flags override it)")
    p.add_argument("--model", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("--members", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--output", help="Zarr store URL")
    p.add_argument(
        "--scenario",
        choices=["unconditional", "extreme", "interpolation", "forecast", "extension"],
    )
    p.add_argument(
        "--proposal",
        choices=["prior", "shift", "tail", "fitted"],
        help="how draws are steered (default: shift for extreme, prior otherwise)",
    )
    p.add_argument("--threshold", type=float, help="keep members with a pixel >= this")
    p.add_argument("--threshold-quantile", type=float, help="... >= this training quantile")
    p.add_argument("--condition-data", help="ingested store holding the observed window")
    p.add_argument("--condition-time", help="ISO time of the observed window's first step")
    p.add_argument("--condition-y", type=int, help="first grid row of the observed window")
    p.add_argument("--condition-x", type=int, help="first grid column of the observed window")
    p.add_argument("--context", type=int, help="known leading steps (forecast, extension)")
    p.add_argument("--every", type=int, help="interpolation: every n-th step known")
    p.add_argument("--length", type=int, help="extension: time steps of each member")
    p.add_argument("--guidance", type=float, help="reconstruction guidance weight w_r")
    p.add_argument("--steps", type=int, help="diffusion sampler steps")
    p.add_argument("--sampler", choices=["ancestral", "ddim"])
    p.add_argument("--batch-size", type=int)
    p.add_argument("--chunk-members", type=int)
    p.add_argument("--endpoint-url", help="object-store endpoint (S3/GCS emulators, MinIO)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    p.add_argument(
        "--workers",
        default="auto",
        help="auto (default), local, or a number of Ray workers (see above)",
    )
    args = p.parse_args(argv)
    tree: dict = {}
    if args.request:
        tree = read_tree(args.request)
    for key in (
        "model",
        "members",
        "seed",
        "output",
        "batch_size",
        "chunk_members",
        "steps",
        "sampler",
    ):
        if getattr(args, key) is not None:
            tree[key] = getattr(args, key)
    scenario = tree.setdefault("scenario", {})
    for flag, key in (
        ("scenario", "kind"),
        ("proposal", "proposal"),
        ("threshold", "threshold"),
        ("threshold_quantile", "threshold_quantile"),
        ("context", "context"),
        ("every", "every"),
        ("length", "length"),
        ("guidance", "guidance"),
    ):
        if getattr(args, flag) is not None:
            scenario[key] = getattr(args, flag)
    for part in ("data", "time", "y", "x"):
        value = getattr(args, f"condition_{part}")
        if value is not None:
            scenario.setdefault("condition", {})[part] = value
    if args.endpoint_url:
        tree.setdefault("storage", {})["endpoint_url"] = args.endpoint_url
    return tree, args.tracking_uri, workers_of(args.workers)


def workers_of(value: str) -> int | None:
    """``--workers`` as a worker count: None for ``local``, 0 for ``auto`` on a cluster."""
    value = str(value).strip().lower()
    if value == "local" or (value == "auto" and not os.environ.get("RAY_ADDRESS")):
        return None
    if value == "auto":
        return 0
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ConfigError(f"--workers {value!r}: give auto, local, or a number of Ray workers >= 1")
    return count


def main(argv: list[str] | None = None) -> int:
    argv, verbose = _common.take_verbose(argv)
    _common.setup_logging(verbose)
    try:
        tree, tracking_uri, workers = parse(argv)
    except ConfigError as exc:
        print(f"ensemble: error: {exc}", file=sys.stderr)
        return 2
    try:
        request = EnsembleRequest.model_validate(tree)
    except ValidationError as exc:
        print("ensemble: error: bad request\n" + _common.validation_lines(exc), file=sys.stderr)
        return 2
    uri = tracking.tracking_uri(tracking_uri)
    try:
        tracking.check_tracking(uri)
        if workers is None:
            result = generate(request, tracking_uri=uri, progress=True)
        else:
            from cloudburst.ensembles.fanout import generate_on_cluster
            from cloudburst.training.job import ensure_ray

            ensure_ray()
            result = generate_on_cluster(
                request, workers=workers or None, tracking_uri=uri, progress=True
            )
    except (EnsembleError, EnsembleStoreError, storage.StorageError, tracking.TrackingError) as exc:
        print(f"ensemble: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a write that still failed once its retries were spent
        print(
            f"ensemble: error: {storage.gave_up('writing', request.output, exc)}", file=sys.stderr
        )
        print("ensemble: re-run the same command to finish it", file=sys.stderr)
        return 2
    rate = result.members / result.seconds if result.seconds > 0 else float("inf")
    print(
        json.dumps(
            {
                "output": result.output,
                "members": result.members,
                "model": result.model_version,
                "chunks_written": result.chunks_written,
                "seconds": round(result.seconds, 2),
                "members_per_second": round(rate, 1),
                "acceptance_rate": result.acceptance_rate,
                "workers": result.workers,
            },
            indent=2,
        )
    )
    print(f"ensemble: {result.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
