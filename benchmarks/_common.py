"""What every benchmark sets up before it imports cloudburst, Ray or MLflow: the package of
this checkout and the tests' loopback helpers on the path, and quiet local defaults (no usage
statistics, no token auth on a local Ray, no telemetry or artifact progress bars: the
``import``, ``program`` and ``local`` scopes of :mod:`cloudburst.environment`)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

for _path in (ROOT / "tests", ROOT / "platform"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# only now can the package be imported; it loads nothing but the standard library here
from cloudburst import environment  # noqa: E402

environment.apply_defaults(environment.IMPORT, environment.PROGRAM, environment.LOCAL)
