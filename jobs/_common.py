"""What the jobs share: the package on the path and the environment defaults (both on import,
before Ray or MLflow load), console logging (:func:`setup_logging`, first thing in a job's
``main``) and argument handling (``--config FILE`` plus ``key=value`` overrides).
"""

from __future__ import annotations

import argparse
import os
import sys

# the jobs run from a checkout (ray job submit --working-dir .) as well as from an install
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(_ROOT, "platform") not in sys.path:
    sys.path.insert(0, os.path.join(_ROOT, "platform"))

# only now can the package be imported; it loads nothing but the standard library here
from cloudburst import environment  # noqa: E402

environment.apply_defaults()  # no usage reporting; what the user exported wins


def take_verbose(argv: list[str] | None) -> tuple[list[str], bool]:
    """(the arguments without ``--verbose``, whether it was given): every job takes it, and
    then shows Ray's and MLflow's own INFO chatter and Cloudburst's DEBUG records."""
    args = list(sys.argv[1:] if argv is None else argv)
    return [a for a in args if a != "--verbose"], "--verbose" in args


def setup_logging(verbose: bool = False) -> None:
    """The job's console: ``cloudburst`` log records at INFO (DEBUG with ``verbose``) on
    stderr, one short line each; other libraries' loggers stay at WARNING. A job's result is
    printed to stdout, not logged."""
    environment.setup_logging(verbose)


def job_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config (default: the embedded defaults)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. synthetic.nt=365 data.windows.length=4",
    )
    return parser


def nul_argument(argv: list[str] | None) -> str | None:
    """The first argument holding a NUL byte (no path or value can), else None."""
    args = sys.argv[1:] if argv is None else argv
    return next((a for a in args if "\x00" in a), None)


def refuse_nul(argv: list[str] | None, name: str) -> None:
    """Exit with status 2, saying which argument, when one holds a NUL byte."""
    bad = nul_argument(argv)
    if bad is not None:
        print(
            f"{name}: error: argument {bad!r} contains a NUL byte (\\x00); remove it",
            file=sys.stderr,
        )
        raise SystemExit(2)


def load_job_config(
    cls: type, argv: list[str] | None, description: str, name: str | None = None
) -> object:
    """Parse ``--config`` and overrides into ``cls``; exits with status 2 on a bad config,
    printing ``NAME: error: ...`` (``NAME``: the job, e.g. ``train``) and one line per problem."""
    from cloudburst.config import ConfigError, load_config

    parser = job_parser(description)
    name = name or os.path.splitext(parser.prog)[0]
    refuse_nul(argv, name)
    args = parser.parse_args(argv)
    try:
        return load_config(cls, args.config, args.overrides)
    except ConfigError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def validation_lines(exc: object, flag_prefix: str = "") -> str:
    """One indented line per pydantic validation error: ``  [prefix]field.path: got VALUE;
    message`` (with ``--`` as prefix, fields are spelled as flags: ``--chunk-mb``)."""
    lines = []
    for e in exc.errors():  # type: ignore[attr-defined]
        field = ".".join(map(str, e["loc"])) or "(request)"
        if flag_prefix == "--":
            field = field.replace("_", "-")
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "missing":
            lines.append(f"  {flag_prefix}{field}: missing; it is required")
            continue
        if e["type"] == "finite_number":
            msg = "must be a finite number (nan and inf are not allowed)"
        lines.append(f"  {flag_prefix}{field}: got {e.get('input')!r}; {msg}")
    return "\n".join(lines)
