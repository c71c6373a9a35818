"""A Cloudburst process's surroundings: defaults of environment variables, console logging.

Environment defaults (:data:`DEFAULTS`) are applied with :func:`apply_defaults`, which only
fills in variables that are unset: whatever the user exported wins. Most must be in place
before the library reading them is imported (Ray, MLflow, gcsfs), so entry points apply them
first. Each default belongs to a scope, which says who applies it:

=====================================  ===========  =========  =============================
variable                               default      scope      why
=====================================  ===========  =========  =============================
MLFLOW_DISABLE_TELEMETRY               true         import     no usage reporting by MLflow
GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT      false        import     gcsfs probes each bucket for
                                                               hierarchical namespaces: 60 s
                                                               per call on emulators, anon
RAY_USAGE_STATS_ENABLED                0            program    no usage reporting by Ray
DO_NOT_TRACK                           1            program    the same, for every library
                                                               honouring it
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER      0            local      ``ray start --node-ip-address
                                                               127.0.0.1`` binds loopback
RAY_AUTH_MODE                          disabled     local      a local ``ray.init()`` would
                                                               switch token auth on for
                                                               later ``ray start``/``ray job``
RAY_SERVE_DEFAULT_HTTP_HOST            127.0.0.1    local      Serve on loopback only
MLFLOW_SERVER_ENABLE_JOB_EXECUTION     false        local      ``mlflow server``: 430 MB
                                                               instead of 1.8 GB
MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR   false        local      no progress bars in logs
AWS_EC2_METADATA_DISABLED              true         emulator   no cloud metadata probes
AWS_DEFAULT_REGION                     us-east-1    emulator   no region guessing
NO_GCE_CHECK                           true         emulator   no GCE metadata probe
=====================================  ===========  =========  =============================

Scopes and who applies them:

- ``import``: every process that imports :mod:`cloudburst.storage` or
  :mod:`cloudburst.tracking` (they apply it at import, before fsspec or MLflow load);
- ``program``: Cloudburst's own programs: the jobs (``jobs/_common.py``), the ``cloudburst``
  CLI, the benchmarks and the tests;
- ``local``: a stack on this machine's loopback: the Makefile, the benchmarks, the tests.
  Not for jobs submitted to a real cluster (token auth, Serve on a public interface);
- ``emulator``: object-store emulators on loopback: the Makefile (the tests set them, with
  throw-away credentials, through ``tests/servers.py``'s ``TEST_ENV``). Never on a cloud
  machine: they switch off instance credentials.

The Makefile exports the same values for the shell commands it runs (``ray start``, ...);
``tests/test_environment.py`` checks that the two agree.

Console logging (:func:`setup_logging`): the jobs and the CLI show the ``cloudburst`` loggers
at INFO on stderr; other libraries' loggers stay at Python's default (WARNING).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

IMPORT = "import"
PROGRAM = "program"
LOCAL = "local"
EMULATOR = "emulator"
SCOPES = (IMPORT, PROGRAM, LOCAL, EMULATOR)


@dataclass(frozen=True)
class Default:
    """One environment variable's default, its scope (see the module doc) and why."""

    name: str
    value: str
    scope: str
    why: str


DEFAULTS: tuple[Default, ...] = (
    Default("MLFLOW_DISABLE_TELEMETRY", "true", IMPORT, "no usage reporting by MLflow"),
    Default(
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
        "false",
        IMPORT,
        "else gcsfs probes every bucket for hierarchical namespaces; against emulators and "
        "with anonymous access that hangs about 60 s per bucket call (read once, at import)",
    ),
    Default("RAY_USAGE_STATS_ENABLED", "0", PROGRAM, "no usage reporting by Ray"),
    Default("DO_NOT_TRACK", "1", PROGRAM, "no usage reporting by libraries honouring it"),
    Default(
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
        "0",
        LOCAL,
        "else `ray start --node-ip-address=127.0.0.1` binds to another interface",
    ),
    Default(
        "RAY_AUTH_MODE",
        "disabled",
        LOCAL,
        "a local ray.init() would switch token auth on, and later `ray start` / `ray job "
        "submit` fail without the token: the same everywhere",
    ),
    Default("RAY_SERVE_DEFAULT_HTTP_HOST", "127.0.0.1", LOCAL, "Ray Serve on loopback only"),
    Default(
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION",
        "false",
        LOCAL,
        "an `mlflow server` takes 430 MB instead of 1.8 GB",
    ),
    Default(
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false", LOCAL, "no progress bars in test logs"
    ),
    Default("AWS_EC2_METADATA_DISABLED", "true", EMULATOR, "no EC2 metadata probe"),
    Default("AWS_DEFAULT_REGION", "us-east-1", EMULATOR, "no region guessing"),
    Default("NO_GCE_CHECK", "true", EMULATOR, "no GCE metadata probe"),
)


def defaults(*scopes: str) -> dict[str, str]:
    """Variable -> default value, for the given scopes (all of them when none is given)."""
    unknown = set(scopes) - set(SCOPES)
    if unknown:
        raise ValueError(f"unknown scope(s) {sorted(unknown)}; known: {', '.join(SCOPES)}")
    wanted = set(scopes or SCOPES)
    return {d.name: d.value for d in DEFAULTS if d.scope in wanted}


def apply_defaults(*scopes: str) -> dict[str, str]:
    """Set the defaults of ``scopes`` (default: ``import`` and ``program``) that are not set
    yet (``os.environ.setdefault``: a value the user set is never replaced). Returns the
    variables it set."""
    applied = {}
    for name, value in defaults(*(scopes or (IMPORT, PROGRAM))).items():
        if name not in os.environ:
            applied[name] = value
        os.environ.setdefault(name, value)
    return applied


# ---------------------------------------------------------------------------- console logging

LOGGER = "cloudburst"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each record (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:  # StreamHandler.__init__ assigns it
        pass


VERBOSE_ENV = "CLOUDBURST_VERBOSE"  # "1": the libraries' own INFO records too, in every process
QUIET = (
    "ray",
    "ray.train",  # Ray Train sets its own level in its processes
    "ray.tune",
    "ray.serve",
    "ray.data",
    "mlflow",
    "urllib3",
    "botocore",
    "s3fs",
    "filelock",
    "alembic",
    "httpx",
)


def verbose() -> bool:
    """Whether ``--verbose`` (``CLOUDBURST_VERBOSE=1``) asked for the libraries' chatter."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def quiet_libraries(chatty: bool | None = None) -> None:
    """Ray's, MLflow's and the storage clients' loggers at WARNING (their INFO lines are
    chatter on a job's console), or back at INFO when ``chatty`` (default: :func:`verbose`).
    MLflow, which sets its own level when imported, and its artifact progress bars follow
    through ``MLFLOW_LOGGING_LEVEL`` and ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR`` (a value
    the user exported wins), also in the processes this one starts."""
    chatty = verbose() if chatty is None else chatty
    level = logging.INFO if chatty else logging.WARNING
    for name in QUIET:
        logging.getLogger(name).setLevel(level)
    if chatty:
        os.environ["MLFLOW_LOGGING_LEVEL"] = "INFO"
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "true"
    else:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def setup_logging(verbose: bool = False) -> logging.Logger:
    """Show Cloudburst's log records on stderr: INFO and above (DEBUG with ``verbose``), one
    short line each. Other libraries' loggers stay at WARNING (their INFO chatter is back with
    ``verbose``, which also sets ``CLOUDBURST_VERBOSE`` for the processes this one starts).
    Idempotent; returns the ``cloudburst`` logger."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    quiet_libraries(verbose or None)
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler = next((h for h in logger.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
        logger.addHandler(handler)
    return logger
