"""Environment defaults, console logging, completion markers and the TCP probe: the small
shared helpers of the package."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cloudburst import environment, markers, netcheck, storage

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------- environment


def test_apply_defaults_fills_in_and_never_overrides(monkeypatch):
    for name in environment.defaults():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")  # the user's choice
    applied = environment.apply_defaults()
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "1"
    assert "RAY_USAGE_STATS_ENABLED" not in applied
    assert applied == {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "DO_NOT_TRACK": "1",
    }
    assert "RAY_AUTH_MODE" not in os.environ  # "local" only where asked for
    assert environment.apply_defaults() == {}  # idempotent
    environment.apply_defaults(environment.LOCAL, environment.EMULATOR)
    assert os.environ["RAY_AUTH_MODE"] == "disabled" and os.environ["NO_GCE_CHECK"] == "true"


def test_unknown_scope_is_refused():
    with pytest.raises(ValueError, match="unknown scope"):
        environment.apply_defaults("everything")


def test_the_makefile_exports_the_same_defaults():
    exports = dict(
        re.findall(r"^export (\w+) \?= (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    )
    table = environment.defaults()
    assert exports == {k: v for k, v in table.items() if k in exports}
    # the progress bar only matters to Python processes logging artifacts
    assert set(table) - set(exports) == {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"}


def test_every_default_is_in_the_documented_table():
    doc = environment.__doc__ or ""
    for d in environment.DEFAULTS:
        assert re.search(rf"^{d.name}\s+{re.escape(d.value)}\s+{d.scope}\b", doc, re.M), d.name


def test_setup_logging_shows_cloudburst_info_on_current_stderr(capsys):
    logger = environment.setup_logging()
    environment.setup_logging()  # idempotent: one handler
    try:
        assert sum(isinstance(h, logging.StreamHandler) for h in logger.handlers) == 1
        logging.getLogger("cloudburst.test").info("hello %s", "there")
        logging.getLogger("cloudburst.test").debug("not shown")
        err = capsys.readouterr().err
        assert "INFO cloudburst.test: hello there" in err and "not shown" not in err
        assert logging.getLogger("some_library").getEffectiveLevel() >= logging.WARNING
    finally:
        logger.setLevel(logging.NOTSET)
        for h in list(logger.handlers):
            logger.removeHandler(h)


# ---------------------------------------------------------------------------- markers


def test_fingerprints_keep_their_values():
    # the keys stores already on disk carry: these must never change
    identity = {"b": [1, 2.5, None], "a": "x"}
    expected = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    assert markers.fingerprint(identity) == expected
    assert markers.fingerprint(identity, default=str) == expected
    odd = {"t": Path("/x")}
    with pytest.raises(TypeError):
        markers.fingerprint(odd)
    assert markers.fingerprint(odd, default=str) == markers.fingerprint({"t": "/x"})


def test_marker_round_trip_and_legacy_location(tmp_path):
    url = str(tmp_path / "store.zarr")
    assert markers.read_marker(url) is None
    markers.write_marker(url, {"fingerprint": "abc", "n": 1})
    path = tmp_path / "store.zarr" / storage.SIDECAR / "complete.json"
    assert json.loads(path.read_text()) == {"fingerprint": "abc", "n": 1}
    assert path.read_text() == json.dumps({"fingerprint": "abc", "n": 1}, indent=1)
    assert markers.read_marker(url) == {"fingerprint": "abc", "n": 1}
    markers.remove_marker(url)
    assert markers.read_marker(url) is None
    (tmp_path / "store.zarr" / ".old.json").write_text('{"fingerprint": "old"}')
    assert markers.read_marker(url) is None
    assert markers.read_marker(url, legacy=(".old.json",)) == {"fingerprint": "old"}
    markers.remove_marker(url, legacy=(".old.json",))
    assert markers.read_marker(url, legacy=(".old.json",)) is None


# ---------------------------------------------------------------------------- netcheck


def test_tcp_probe_reachable_and_refused():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        assert netcheck.tcp_probe("127.0.0.1", port, 2.0) is None
    reason = netcheck.tcp_probe("127.0.0.1", port, 2.0)  # closed now
    assert isinstance(reason, str) and reason


@pytest.mark.parametrize(
    "url, address",
    [
        ("http://127.0.0.1:9000", ("127.0.0.1", 9000)),
        ("https://storage.example.org", ("storage.example.org", 443)),
        ("http://example.org/path", ("example.org", 80)),
        ("127.0.0.1:4443", ("127.0.0.1", 4443)),
        ("localhost", ("localhost", 80)),
    ],
)
def test_endpoint_address(url, address):
    assert netcheck.endpoint_address(url) == address


def test_environment_loads_no_third_party_module():
    # jobs/_common.py and benchmarks/_common.py import it before Ray, MLflow or gcsfs load
    code = (
        "import sys; import cloudburst.environment; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'ray', 'mlflow', 'fsspec', 'gcsfs', 'numpy', 'zarr', 'torch', 'pydantic'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT / "platform")},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]"
