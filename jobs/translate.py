"""Translate a store's variable with a registered model (e.g. infrared to visible imagery), or
encode it into a discrete coder's codes, into a Zarr store with provenance.

    python jobs/translate.py --model models:/cloudburst-vqvae-seviri@candidate \\
        --input outputs/seviri/pair.zarr --output outputs/seviri/visible.zarr
    python jobs/translate.py --codes --model models:/cloudburst-vqvae-fraser@candidate \\
        --input outputs/fraser/precip.zarr --output outputs/fraser/codes.zarr

The input variable is the one the model was trained on (``--variable`` names another).
Re-running the same request keeps the complete store; another request on it is refused.
Ends with the line ``translation: OUTPUT`` (``codes: OUTPUT``).
"""

from __future__ import annotations

import argparse
import sys

import _common  # also puts the package on sys.path when run from a checkout


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("--input", required=True, help="ingested store to read")
    p.add_argument("--output", required=True, help="Zarr store to write")
    p.add_argument("--variable", help="input variable (default: the model's)")
    p.add_argument("--codes", action="store_true", help="write the codes instead")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint of the stores")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    _common.refuse_nul(argv, "translate")
    argv, verbose = _common.take_verbose(argv)
    args = parse(argv)
    _common.setup_logging(verbose)
    from cloudburst import storage
    from cloudburst.config import StorageConfig
    from cloudburst.data.ingest import StoreError
    from cloudburst.models.roles import RoleError
    from cloudburst.products.codes import encode_store
    from cloudburst.products.derived import DerivedStoreError
    from cloudburst.products.translate import translate_store
    from cloudburst.tracking import TrackingError, load_model

    settings = StorageConfig(endpoint_url=args.endpoint_url)
    source_options = storage.options_from(args.input, settings)
    output_options = storage.options_from(args.output, settings)
    try:
        model = load_model(args.model, tracking_uri=args.tracking_uri)
        make = encode_store if args.codes else translate_store
        marker = make(
            model,
            args.input,
            args.output,
            model_uri=args.model,
            variable=args.variable,
            source_options=source_options,
            output_options=output_options,
        )
    except (
        DerivedStoreError,
        StoreError,
        TrackingError,
        RoleError,
        ValueError,
        FileNotFoundError,
    ) as exc:
        print(f"translate: error: {exc}", file=sys.stderr)
        return 2
    if args.codes:
        print(
            f"codes: {args.output} ({marker['codes']} codes, {marker['ratio']:.1f}x fewer bits "
            f"than float32, {marker['codebook_usage']:.0%} of the codebook used)"
        )
    else:
        print(f"translation: {args.output} ({marker['variable']}, {marker['shape']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
