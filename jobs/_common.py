"""Shared argument handling of the jobs (``--config FILE`` plus ``key=value`` overrides)."""

from __future__ import annotations

import argparse
import os
import sys

# the jobs run from a checkout (ray job submit --working-dir .) as well as from an install
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(_ROOT, "platform") not in sys.path:
    sys.path.insert(0, os.path.join(_ROOT, "platform"))


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


def load_job_config(cls: type, argv: list[str] | None, description: str) -> object:
    """Parse ``--config`` and overrides into ``cls``; exits with status 2 on a bad config."""
    from cloudburst.config import ConfigError, load_config

    args = job_parser(description).parse_args(argv)
    try:
        return load_config(cls, args.config, args.overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None


def validation_lines(exc: object, flag_prefix: str = "") -> str:
    """One indented line per pydantic validation error: ``  [prefix]field.path: message``."""
    errors = exc.errors()  # type: ignore[attr-defined]
    return "\n".join(f"  {flag_prefix}{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
