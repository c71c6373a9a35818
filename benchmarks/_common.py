"""What every benchmark sets up before it imports cloudburst, Ray or MLflow: the package of
this checkout and the tests' loopback helpers on the path, and quiet local defaults (no usage
statistics, no token auth on a local Ray, no telemetry or artifact progress bars)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

for _path in (ROOT / "tests", ROOT / "platform"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
for _key, _value in (
    ("RAY_USAGE_STATS_ENABLED", "0"),
    ("RAY_AUTH_MODE", "disabled"),
    ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"),
    ("MLFLOW_DISABLE_TELEMETRY", "true"),
    ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"),
):
    os.environ.setdefault(_key, _value)
