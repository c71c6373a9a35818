"""What every benchmark sets up before it imports cloudburst, Ray or MLflow: the package of
this checkout and the tests' loopback helpers on the path, and quiet local defaults (no usage
statistics, no token auth on a local Ray, no telemetry or artifact progress bars: the
``import``, ``program`` and ``local`` scopes of :mod:`cloudburst.environment`)."""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

for _path in (ROOT / "tests", ROOT / "platform"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# only now can the package be imported; it loads nothing but the standard library here
from cloudburst import environment  # noqa: E402

environment.apply_defaults(environment.IMPORT, environment.PROGRAM, environment.LOCAL)


# ------------------------------------------------------------------ the ensemble endpoint


def wait_healthy(base: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the endpoint at {base} did not answer within {timeout:g} s")


def submit_and_wait(base: str, request: Any) -> dict:
    """POST an EnsembleRequest to the endpoint at ``base``; poll until the job ends; its
    final state (RuntimeError unless done)."""
    body = json.dumps(request.model_dump(mode="json", exclude={"storage"})).encode()
    req = urllib.request.Request(f"{base}/v1/ensembles", data=body, method="POST")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=60) as resp:
        job_id = json.loads(resp.read())["id"]
    while True:
        with urllib.request.urlopen(f"{base}/v1/ensembles/{job_id}", timeout=60) as resp:
            state = json.loads(resp.read())
        if state["status"] in ("done", "failed", "cancelled"):
            break
        time.sleep(0.25)
    if state["status"] != "done":
        raise RuntimeError(f"the endpoint's job ended {state['status']}: {state.get('error')}")
    return state
