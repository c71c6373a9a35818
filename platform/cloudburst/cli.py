"""``cloudburst``: the command line over the same functions the jobs call."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from cloudburst import environment, storage
from cloudburst.config import (
    ConfigError,
    IngestConfig,
    SyntheticConfig,
    WindowConfig,
    apply_overrides,
    validate,
)
from cloudburst.data.ingest import StoreError, describe, ingest_config, open_store
from cloudburst.data.references import ReferenceError, build_references, write_references
from cloudburst.data.sources import SourceError
from cloudburst.data.windows import WindowError, build_index, parse_split, split_index

USER_ERRORS = (
    SourceError,
    StoreError,
    storage.StorageError,
    WindowError,
    ConfigError,
    ReferenceError,
    FileNotFoundError,
    ValueError,
)


def _storage_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("object storage (also CLOUDBURST_ENDPOINT_URL, CLOUDBURST_ANON)")
    g.add_argument("--endpoint-url", help="S3/GCS-compatible endpoint, e.g. http://127.0.0.1:9000")
    g.add_argument("--anon", action="store_true", default=None, help="anonymous access")
    g.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra fsspec option (repeatable)",
    )


def key_values(items: list[str], flag: str, example: str) -> dict[str, Any]:
    """``KEY=VALUE`` arguments of ``flag`` as a mapping (values parsed as YAML)."""
    for item in items:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(
                f"{flag} {item!r} is not of the form KEY=VALUE, e.g. {flag} {example}"
            )
    return apply_overrides({}, items)


def options_for(url: str, args: argparse.Namespace) -> dict[str, Any]:
    extra = (
        key_values(args.storage_option, "--storage-option", "requester_pays=true")
        if args.storage_option
        else None
    )
    return storage.storage_options(url, endpoint_url=args.endpoint_url, anon=args.anon, extra=extra)


def _floats(text: str, n: int, what: str) -> tuple[float, ...]:
    parts = [p for p in text.split(",") if p.strip()]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != n:
        raise argparse.ArgumentTypeError(f"{what} must be {n} comma-separated numbers: {text!r}")
    return values


def _bbox(text: str) -> tuple[float, ...]:
    return _floats(text, 4, "--bbox W,S,E,N")


def _range(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A-B, e.g. 150-300 (got {text!r})") from None
    return a, b


def _chunks(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if not value.isdigit():
            raise argparse.ArgumentTypeError(
                f"--chunks takes DIM=N pairs, e.g. time=240,y=64,x=64 (got {text!r})"
            )
        out[key.strip()] = int(value)
    return out


def _member(text: str) -> int | str:
    """A member label: a number where it is one (UKCP18 labels members 1, 4, ...), else text."""
    return int(text) if text.lstrip("-").isdigit() else text


def cmd_ingest(args: argparse.Namespace) -> int:
    cfg = validate(
        IngestConfig,
        {
            "source": args.source,
            "target": args.target,
            "variable": args.variable,
            "units": args.units,
            "bbox": args.bbox,
            "coarsen": args.coarsen,
            "chunks": args.chunks,
            "bins": args.bins,
            "time_start": args.time_start,
            "time_end": args.time_end,
            "member": args.member,
        },
        "command line",
    )
    result = ingest_config(
        cfg,
        source_options=options_for(args.source, args),
        target_options=options_for(args.target, args),
        progress=not args.quiet,
    )
    state = (
        "up to date (nothing written)" if result.skipped else f"written in {result.seconds:.1f} s"
    )
    print(
        f"{args.target}: {result.shape[0]} x {result.shape[1]} x {result.shape[2]} "
        f"(time, y, x), chunks {result.chunks}, {state}"
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    print(json.dumps(describe(args.target, options_for(args.target, args)), indent=2))
    return 0


def cmd_windows(args: argparse.Namespace) -> int:
    wc = validate(
        WindowConfig,
        {
            "length": args.length,
            "size": args.size,
            "stride": args.stride or args.size,
            "time_stride": args.time_stride,
            "doy": args.doy,
            "max_nan_fraction": args.max_nan,
        },
        "command line",
    )
    ds, _ = open_store(args.target, options_for(args.target, args))
    index = build_index(ds, wc)
    if args.split:
        split, part = parse_split(args.split, val_fraction=args.val_fraction, seed=args.seed)
        index = split_index(index, split, part)
    if args.count:
        print(len(index))
        return 0
    print(
        f"{len(index)} windows of {wc.length} x {wc.size} x {wc.size} (time, y, x)"
        + (f" in split {args.split}" if args.split else "")
    )
    rows = index.table(args.limit)
    if rows:
        head = list(rows[0])
        print("  ".join(f"{h:>20}" if h in ("start", "end") else f"{h:>8}" for h in head))
        for r in rows:
            print(
                "  ".join(
                    f"{r[h]!s:>20}" if h in ("start", "end") else f"{r[h]!s:>8}" for h in head
                )
            )
    return 0


def cmd_synthetic(args: argparse.Namespace) -> int:
    cfg = validate(SyntheticConfig, key_values(args.set, "--set", "nt=730"), "--set")
    from cloudburst.data.synthetic import write_synthetic

    result = write_synthetic(
        cfg,
        args.target,
        bins=args.bins,
        target_options=options_for(args.target, args),
        progress=not args.quiet,
    )
    print(
        f"{args.target}: synthetic {result.shape}, max {result.stats.max:.1f} "
        f"{result.stats.units}, wet fraction {result.stats.wet_fraction:.2f}"
    )
    return 0


def cmd_references(args: argparse.Namespace) -> int:
    opts = options_for(args.sources[0], args)
    refs = build_references(args.sources, opts, concat_dim=args.concat_dim)
    write_references(refs, args.output, options_for(args.output, args))
    print(f"{args.output}: references to {len(args.sources)} source pattern(s)")
    return 0


def _tracking_error(args: argparse.Namespace, exc: Exception) -> int:
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    print(f"cloudburst models {args.models_command}: error: {message}", file=sys.stderr)
    return 2


def cmd_models_list(args: argparse.Namespace) -> int:
    from cloudburst import tracking, versions  # mlflow loads in about 1.5 s: only here

    try:
        models = versions.list_models(args.tracking_uri)
    except tracking.TrackingError as exc:
        return _tracking_error(args, exc)
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    if not models:
        where = args.tracking_uri or tracking.tracking_uri(None)
        print(f"no registered models in {where}")
        return 0
    head = ["name", "version", "aliases", "loss", "bins", "dataset", "window", "val_loss"]
    head += ["created", "run_id"]
    rows = []
    for m in models:
        for v in m["versions"]:
            tags = v["tags"]
            val = v["val_loss"]
            rows.append(
                [
                    m["name"],
                    v["version"],
                    ",".join(v["aliases"]) or "-",
                    tags.get("loss", "-"),
                    tags.get("bins", "-"),
                    tags.get("dataset", "-"),
                    tags.get("window", "-"),
                    f"{val:.4g}" if val is not None else "-",
                    v["created"] or "-",
                    v["run_id"] or "-",
                ]
            )
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(f"{str(c):<{w}}" for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_models_promote(args: argparse.Namespace) -> int:
    from cloudburst import tracking
    from cloudburst.config import StorageConfig
    from cloudburst.evaluation.gate import GateError, promote_gated
    from cloudburst.evaluation.request import EvaluationError

    storage_cfg = StorageConfig(
        endpoint_url=args.endpoint_url,
        anon=args.anon,
        options=key_values(args.storage_option, "--storage-option", "requester_pays=true"),
    )
    try:
        verdict = promote_gated(
            args.name,
            args.version,
            args.alias,
            force=args.force,
            reason=args.reason,
            tracking_uri=args.tracking_uri,
            data=args.data,
            split=args.split,
            samples=args.samples,
            limit=args.limit,
            members=args.members,
            seed=args.seed,
            out=args.out,
            storage=storage_cfg,
        )
    except (tracking.TrackingError, GateError, EvaluationError, *USER_ERRORS) as exc:
        return _tracking_error(args, exc)
    target = f"{verdict.name}@{verdict.alias}"
    if verdict.status == "same":
        print(f"{target} already points at version {verdict.version}; nothing to do")
        return 0
    for line in verdict.lines():
        print(line)
    if not verdict.promoted:
        return _tracking_error(args, GateError(verdict.refusal()))
    if verdict.status == "no-champion":
        print(f"{target} pointed at no version: promoted without a comparison")
    elif verdict.status == "forced":
        what = "could not compare" if verdict.error else "refused"
        print(f"gate {what}, promoted anyway (--force): {verdict.reason}")
    else:
        print("gate passed")
    moved = f" (was version {verdict.champion})" if verdict.champion else ""
    print(f"{target} -> version {verdict.version}{moved}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cloudburst", description="Precipitation data, models and ensembles."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="archive -> analysis-ready Zarr v3 store with statistics")
    p.add_argument("source", help="NetCDF/HDF5/Zarr path or URL, glob, or kerchunk JSON")
    p.add_argument("target", help="store path or URL (s3://, gs://, file://)")
    p.add_argument("--variable", help="precipitation variable (found automatically if omitted)")
    p.add_argument("--units", help="units of the variable when the file lacks them")
    p.add_argument("--bbox", type=_bbox, help="W,S,E,N in lon/lat (or x/y for projected grids)")
    p.add_argument("--coarsen", type=int, default=1, help="mean over KxK cells")
    p.add_argument("--chunks", type=_chunks, help="e.g. time=240,y=64,x=64")
    p.add_argument("--bins", type=int, default=100, help="histogram bins stored with the data")
    p.add_argument("--time-start")
    p.add_argument("--time-end")
    p.add_argument(
        "--member", type=_member, help="ensemble member to read (e.g. 1 of UKCP18's members)"
    )
    p.add_argument("--quiet", action="store_true")
    _storage_flags(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("info", help="print a store's summary as JSON")
    p.add_argument("target")
    _storage_flags(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("windows", help="count or list the sample windows of a store")
    p.add_argument("target")
    p.add_argument("--length", type=int, required=True, help="time steps per window")
    p.add_argument("--size", type=int, required=True, help="pixels per side")
    p.add_argument("--stride", type=int, help="spatial stride (default: size)")
    p.add_argument("--time-stride", type=int, default=1)
    p.add_argument("--doy", type=_range, help="day-of-year range, e.g. 150-300")
    p.add_argument(
        "--max-nan", type=float, default=0.0, help="drop windows above this NaN fraction"
    )
    p.add_argument(
        "--split", help="PART[@SCHEME]: e.g. test, train@years:1981-2010/2011-2019, val@seasons:5"
    )
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--count", action="store_true", help="print only the number of windows")
    p.add_argument("--limit", type=int, default=10, help="rows of the table")
    _storage_flags(p)
    p.set_defaults(func=cmd_windows)

    p = sub.add_parser("synthetic", help="generate synthetic precipitation into a store")
    p.add_argument("target")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="generator option, e.g. --set nt=730 --set freq=1h (repeatable)",
    )
    p.add_argument("--bins", type=int, default=100)
    p.add_argument("--quiet", action="store_true")
    _storage_flags(p)
    p.set_defaults(func=cmd_synthetic)

    p = sub.add_parser("references", help="kerchunk references over NetCDF files, as JSON")
    p.add_argument("sources", nargs="+", help="files or glob patterns (combined along time)")
    p.add_argument("--output", required=True, help="JSON path or URL")
    p.add_argument("--concat-dim", default="time")
    _storage_flags(p)
    p.set_defaults(func=cmd_references)

    p = sub.add_parser("models", help="registered models in MLflow: list, promote")
    msub = p.add_subparsers(dest="models_command", required=True)
    uri_help = "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else outputs/mlflow)"
    q = msub.add_parser("list", help="registered models, their versions, aliases and tags")
    q.add_argument("--tracking-uri", help=uri_help)
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.set_defaults(func=cmd_models_list)
    q = msub.add_parser(
        "promote",
        help="point an alias (default: champion) at a version if it passes the promotion gate",
        description="Point ALIAS of NAME at VERSION. When ALIAS already points at a version, "
        "both are evaluated together on the same split (cloudburst.evaluation.gate) and "
        "VERSION is refused if it is worse beyond the tolerance on a gate metric of its "
        "model family; --force --reason TEXT promotes it anyway. The verdict is recorded "
        "as gate.* tags of VERSION.",
    )
    q.add_argument("name", help="registered model name")
    q.add_argument("version", help="model version number")
    q.add_argument("--alias", default="champion")
    q.add_argument("--tracking-uri", help=uri_help)
    q.add_argument("--force", action="store_true", help="promote even if refused (needs --reason)")
    q.add_argument("--reason", help="why the gate is overridden (recorded on the version)")
    q.add_argument("--data", help="store to evaluate on (default: the version's dataset tag)")
    q.add_argument(
        "--split",
        default="test",
        help="PART[@SCHEME] (default: test, the candidate's training split), e.g. test@seasons:5",
    )
    q.add_argument("--samples", type=int, default=256, help="generated windows per model (256)")
    q.add_argument("--limit", type=int, default=256, help="observed windows, evenly spread (256)")
    q.add_argument("--members", type=int, default=8, help="posterior draws per window (8)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument(
        "--out", help="evaluation folder (default: outputs/promotion-gate/NAME-vV-vs-vC)"
    )
    _storage_flags(q)
    q.set_defaults(func=cmd_models_promote)
    for group in (sub, msub):  # a missing command is named by its choices, not its dest
        group.metavar = "{" + ",".join(group.choices) + "}"
    return parser


def main(argv: list[str] | None = None) -> int:
    environment.apply_defaults()  # before a command loads Ray or MLflow; the user's values win
    environment.setup_logging()  # progress and warnings on stderr; results are printed
    bad = next((a for a in (sys.argv[1:] if argv is None else argv) if "\x00" in a), None)
    if bad is not None:  # no path, URL or value holds one; the OS would refuse it mid-command
        print(
            f"cloudburst: error: argument {bad!r} contains a NUL byte (\\x00); remove it",
            file=sys.stderr,
        )
        return 2
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except USER_ERRORS as exc:
        # one line: config errors list their problems on lines of their own
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"cloudburst {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
