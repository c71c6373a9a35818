"""MLflow glue: where runs go, the whole config as params, and packaged models in the registry.

Used from rank 0 of training only (MLflow's fluent API keeps process-wide state).

Where runs go (:func:`tracking_uri`): the configured URI, else ``MLFLOW_TRACKING_URI``, else a
local SQLite store ``outputs/mlflow/mlflow.db`` with artifacts under ``outputs/mlflow/artifacts``.
For every SQLite store, experiments created through :func:`use_experiment` keep their artifacts
in ``artifacts/`` beside the database (never in an ``mlruns/`` of the working directory). A
tracking server (http/https) is checked first by :func:`check_tracking`, which fails within
seconds instead of MLflow's minutes of retries.

A packaged model (:class:`cloudburst.models.package.PrecipitationModel`, a folder) is logged
to MLflow as a pyfunc model (:class:`PrecipitationPyfunc`) whose only artifact is that folder.
The pyfunc convention: ``predict`` takes a float32 tensor (n, time, y, x) of precipitation in
physical units (NaN allowed for missing values) and returns its reconstruction, same shape,
physical units. Sampling is not a pyfunc call: :func:`load_model` (``models:/NAME@champion``,
``models:/NAME/3``, ``runs:/...`` or a local folder) returns the :class:`PrecipitationModel`
with ``.sample(n, seed)`` and ``.reconstruct(x)``; the unwrapped pyfunc model
(``mlflow.pyfunc.load_model(uri).unwrap_python_model()``) has the same two methods.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from cloudburst import environment, netcheck

log = logging.getLogger(__name__)

# No usage reporting from a training cluster; set before mlflow loads.
environment.apply_defaults(environment.IMPORT)

import mlflow  # noqa: E402
import mlflow.pyfunc  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.models import ModelSignature  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.types import Schema, TensorSpec  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from cloudburst import registry_notes  # noqa: E402
from cloudburst.models.package import METADATA_FILE, PrecipitationModel  # noqa: E402
from cloudburst.models.roles import Generative  # noqa: E402

DEFAULT_EXPERIMENT = "cloudburst"
PARAM_VALUE_LIMIT = 500  # MLflow servers before 2.x-era migrations cap param values at 500 chars
PARAM_KEY_LIMIT = 250
CONNECT_TIMEOUT_S = 3.0
HTTP_TIMEOUT_S = 5.0
PACKAGE_ARTIFACT = "package"


class TrackingError(RuntimeError):
    """MLflow cannot be used as asked; the message says what to do."""


# ------------------------------------------------------------------------------ where runs go


def tracking_uri(configured: str | None = None, *, root: str | Path | None = None) -> str:
    """The configured URI, else ``MLFLOW_TRACKING_URI``, else a local SQLite store.

    The local store is ``sqlite:///<root>/outputs/mlflow/mlflow.db`` (``root``: the working
    directory) with ``artifacts/`` beside it; both folders are created.
    """
    if configured:
        return str(configured)
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    base = (Path(root) if root is not None else Path.cwd()).resolve() / "outputs" / "mlflow"
    (base / "artifacts").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path).resolve() if path and path != ":memory:" else None


def artifact_root(uri: str) -> str | None:
    """Where experiments of a SQLite store keep artifacts (``artifacts/`` beside the database).

    ``None`` for other stores: a tracking server decides (``--artifacts-destination``).
    """
    db = _sqlite_path(uri)
    if db is None:
        return None
    return (db.parent / "artifacts").as_uri()


def check_tracking(uri: str) -> None:
    """Fail fast, with what to do, when ``uri`` cannot be used.

    http(s): a TCP connect (3 s), then ``GET /health`` and, if that is not 200 (a proxy, a
    path prefix), the experiments API (5 s each at most). SQLite: the database's folder is
    created. Other schemes are not checked.
    """
    db = _sqlite_path(uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(
                f"cannot create the folder of the MLflow store {uri}: {exc}"
            ) from None
        return
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    host, port = netcheck.endpoint_address(uri)
    advice = (
        "Start the server (e.g. `mlflow server --backend-store-uri sqlite:///mlflow.db "
        f"--host {host} --port {port}`), or point --tracking-uri / MLFLOW_TRACKING_URI at a "
        "reachable server, or unset both to use the local store under outputs/mlflow"
    )
    refused = netcheck.tcp_probe(host, port, CONNECT_TIMEOUT_S)
    if refused is not None:
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({refused}). {advice}.")
    base = uri.rstrip("/")
    headers = _auth_headers()
    status, detail = _http_get(f"{base}/health", {}, HTTP_TIMEOUT_S)
    if status == 200:
        return
    if status == 0:  # connected, but no HTTP answer: do not wait a second time
        raise TrackingError(
            f"MLflow tracking server {uri} accepts connections but gives no answer ({detail}). "
            f"{advice}."
        )
    status, detail = _http_get(
        f"{base}/api/2.0/mlflow/experiments/search?max_results=1", headers, HTTP_TIMEOUT_S
    )
    if status == 200:
        return
    if status in (401, 403):
        raise TrackingError(
            f"MLflow tracking server {uri} refused the credentials (HTTP {status}); set "
            "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN."
        )
    raise TrackingError(
        f"{uri} accepts connections but does not answer as an MLflow tracking server "
        f"({detail}). {advice}."
    )


def _auth_headers() -> dict[str, str]:
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = (
        os.environ.get("MLFLOW_TRACKING_USERNAME"),
        os.environ.get("MLFLOW_TRACKING_PASSWORD"),
    )
    if user and password:
        import base64

        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {basic}"}
    return {}


def _http_get(url: str, headers: dict[str, str], timeout: float) -> tuple[int, str]:
    """(status, short description); status 0 when no HTTP answer came."""
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310
            return int(resp.status), f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return int(exc.code), f"HTTP {exc.code} from {url}"
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return 0, f"no answer from {url} within {timeout:g} s: {reason}"


def setup(configured: str | None = None, experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Resolve and check the tracking URI, make it MLflow's (tracking and registry), and make
    ``experiment`` the active one (created with artifacts beside a SQLite store). Returns the URI.
    """
    uri = tracking_uri(configured)
    check_tracking(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    use_experiment(experiment)
    return uri


def use_experiment(name: str = DEFAULT_EXPERIMENT) -> str:
    """Make ``name`` the active experiment of the current tracking URI; returns its id.

    Created on first use; on a SQLite store its artifacts go to ``artifacts/<name>`` beside the
    database (MLflow's default would be ``./mlruns`` of the working directory). Create it in
    the driver before several processes log to a fresh SQLite store (they race otherwise).
    """
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is None:
        root = artifact_root(mlflow.get_tracking_uri())
        location = f"{root}/{_safe_name(name)}" if root else None
        try:
            experiment_id = client.create_experiment(name, artifact_location=location)
        except MlflowException:
            found = client.get_experiment_by_name(name)  # created meanwhile by another process
            if found is None:
                raise
            experiment_id = found.experiment_id
    else:
        experiment_id = found.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return str(experiment_id)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "experiment"


# --------------------------------------------------------------------------------- params


def flatten_params(config: BaseModel | Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A (nested) config as MLflow params: dotted keys, string values of at most 500 chars.

    Lists and tuples become JSON (``[64, 128, 256]``), None ``None``; longer values are cut
    to 500 characters ending in ``...``; characters MLflow refuses in keys become ``_``.
    """
    tree = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    out: dict[str, str] = {}
    _flatten(tree, prefix, out)
    return out


def _flatten(node: Any, key: str, out: dict[str, str]) -> None:
    if isinstance(node, BaseModel):
        node = node.model_dump(mode="json")
    if isinstance(node, Mapping) and node:
        for k, v in node.items():
            part = re.sub(r"[^A-Za-z0-9_\-. /]", "_", str(k))
            _flatten(v, f"{key}.{part}" if key else part, out)
        return
    if isinstance(node, Mapping):
        value = "{}"
    elif isinstance(node, list | tuple):
        value = json.dumps(_jsonable(node), default=str)
    elif isinstance(node, float) and not math.isfinite(node):
        value = str(node)
    else:
        value = str(node)
    if len(value) > PARAM_VALUE_LIMIT:
        value = value[: PARAM_VALUE_LIMIT - 3] + "..."
    out[(key or "value")[:PARAM_KEY_LIMIT]] = value


def _jsonable(node: Any) -> Any:
    if isinstance(node, BaseModel):
        return node.model_dump(mode="json")
    if isinstance(node, Mapping):
        return {str(k): _jsonable(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_jsonable(v) for v in node]
    return node


def log_config(config: BaseModel | Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Log :func:`flatten_params` of ``config`` to the active run; returns what was logged."""
    params = flatten_params(config, prefix)
    mlflow.log_params(params)
    return params


# ----------------------------------------------------------------------------- packaging


# ------------------------------------------------------------------------ MLflow pyfunc


class PrecipitationPyfunc(mlflow.pyfunc.PythonModel):
    """The pyfunc face of a :class:`PrecipitationModel` (artifact ``package``: its folder).

    ``predict(x)``: x float32 (n, time, y, x) physical units -> reconstruction, same shape (a
    model trained on a pair of variables: the translation, in the target's units).
    """

    def __init__(self) -> None:
        self.package: PrecipitationModel | None = None

    def load_context(self, context: Any) -> None:
        self.package = PrecipitationModel.load(context.artifacts[PACKAGE_ARTIFACT])

    def loaded(self) -> PrecipitationModel:
        """The packaged model behind this pyfunc (raises until MLflow has loaded it)."""
        if self.package is None:
            raise TrackingError(
                "the pyfunc model is not loaded (load it with mlflow or load_model)"
            )
        return self.package

    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        package = self.loaded()
        x = np.asarray(model_input, dtype=np.float32)
        return package.translate(x) if package.target is not None else package.reconstruct(x)

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        return self.loaded().sample(n, seed)

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        return self.loaded().reconstruct(x)


# The pyfunc is logged as "model from code" (this script), not as a pickled object.
_MODEL_CODE = """\
# The MLflow pyfunc of a cloudburst model; its weights and metadata are the artifact "package".
import mlflow.models

from cloudburst.tracking import PrecipitationPyfunc

mlflow.models.set_model(PrecipitationPyfunc())
"""


def signature(window: tuple[int, int, int]) -> ModelSignature:
    """float32 (-1, time, y, x) in, the same out."""
    spec = TensorSpec(np.dtype(np.float32), (-1, *(int(n) for n in window)))
    return ModelSignature(inputs=Schema([spec]), outputs=Schema([spec]))


def _requirements() -> list[str]:
    import pydantic

    from cloudburst import __version__

    return [
        f"cloudburst=={__version__}",
        f"mlflow=={mlflow.__version__}",
        f"torch=={str(torch.__version__).split('+')[0]}",
        f"numpy=={np.__version__}",
        f"pydantic=={pydantic.VERSION}",
    ]


def default_tags(packaged: PrecipitationModel) -> dict[str, str]:
    """Version tags derived from the package (see ``PrecipitationModel.tags``)."""
    return packaged.tags()


@contextlib.contextmanager
def _run(run_id: str | None, experiment: str) -> Iterator[str]:
    """The run to log into: ``run_id``, else the active run, else a new run of ``experiment``."""
    active = mlflow.active_run()
    if run_id is None and active is not None:
        yield active.info.run_id
    elif run_id is not None and active is not None and active.info.run_id == run_id:
        yield run_id
    elif run_id is not None:
        with mlflow.start_run(run_id=run_id, nested=active is not None) as run:
            yield run.info.run_id
    else:
        experiment_id = use_experiment(experiment)
        with mlflow.start_run(experiment_id=experiment_id) as run:
            yield run.info.run_id


def log_model(
    packaged: PrecipitationModel,
    *,
    run_id: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
) -> str:
    """Log ``packaged`` as the pyfunc model ``model`` of a run (``run_id``, else the active
    run, else a new run of ``experiment``), unregistered; returns its ``models:/m-...`` URI
    (register it later with :func:`register_model`)."""
    with tempfile.TemporaryDirectory(prefix="cloudburst-package-") as tmp:
        folder = packaged.save(Path(tmp) / PACKAGE_ARTIFACT)
        code = Path(tmp) / "cloudburst_model.py"
        code.write_text(_MODEL_CODE)
        if packaged.plays(Generative):
            example = packaged.sample(2, seed=0)
        else:  # an input window at the data's mean (the model reconstructs or translates it)
            mean = float((packaged.stats or {}).get("mean") or 0.0)
            example = np.full((2, *packaged.window), mean, dtype=np.float32)
        with _run(run_id, experiment):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(code),
                artifacts={PACKAGE_ARTIFACT: str(folder)},
                signature=signature(packaged.window),
                input_example=example,
                pip_requirements=_requirements(),
                metadata={"cloudburst": packaged.metadata() | {"stats": None}},
            )
    return str(info.model_uri)


def register_model(
    model_uri: str,
    *,
    name: str,
    tags: Mapping[str, Any],
    alias: str | None = "candidate",
) -> tuple[str, str]:
    """Register a logged model (:func:`log_model`) as a version of ``name`` with ``tags``
    and ``alias``; returns (version, ``models:/NAME/VERSION``). If anything fails once the
    version exists, the version is deleted again (and the registered model too if this call
    created it and it is left empty), then :class:`TrackingError` is raised. The version and
    the model are then described (:func:`cloudburst.registry_notes.describe_registration`;
    a failure there is only a warning)."""
    client = MlflowClient()
    version_tags = {str(k): str(v) for k, v in tags.items()}
    existed = _registered_model_exists(client, name)
    version: str | None = None
    try:
        # MLflow prints its two registration lines to stderr; they go to the log (DEBUG)
        with contextlib.redirect_stderr(io.StringIO()) as said:
            mv = mlflow.register_model(model_uri, name, tags=version_tags)
        for line in said.getvalue().splitlines():
            log.debug("mlflow: %s", line)
        version = str(mv.version)
        mv = client.get_model_version(name, version)
        if mv.status != "READY":
            raise TrackingError(f"version {version} of {name} ended in status {mv.status}")
        if alias:
            client.set_registered_model_alias(name, alias, version)
    except Exception as exc:
        _discard(client, name, model_uri, version, existed)
        if isinstance(exc, TrackingError):
            raise
        raise TrackingError(f"registering {model_uri} as {name!r} failed: {exc}") from exc
    registry_notes.describe_registration(name, version, client=client)  # warns, never raises
    return version, f"models:/{name}/{version}"


def log_and_register(
    packaged: PrecipitationModel,
    *,
    name: str,
    tags: Mapping[str, Any] | None = None,
    alias: str | None = "candidate",
    run_id: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    tracking_uri: str | None = None,
) -> tuple[str, str]:
    """Log ``packaged`` as the pyfunc model ``model`` of a run, register it, tag and alias it.

    The run: ``run_id``, else the active run, else a new run of ``experiment``. Version tags:
    :func:`default_tags` updated with ``tags`` (pass ``dataset`` there). ``tracking_uri``, if
    given, becomes MLflow's tracking and registry URI first. Returns (version,
    ``models:/NAME/VERSION``); a failed registration leaves no version behind
    (:func:`register_model`).
    """
    if tracking_uri is not None:
        check_tracking(tracking_uri)
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    model_uri = log_model(packaged, run_id=run_id, experiment=experiment)
    version_tags = {**default_tags(packaged), **{str(k): str(v) for k, v in (tags or {}).items()}}
    return register_model(model_uri, name=name, tags=version_tags, alias=alias)


def _registered_model_exists(client: MlflowClient, name: str) -> bool:
    try:
        client.get_registered_model(name)
    except MlflowException:
        return False
    return True


def _discard(
    client: MlflowClient, name: str, source: str, version: str | None, existed: bool
) -> None:
    """Delete what a failed registration created: its version(s), then an empty new model."""
    with contextlib.suppress(Exception):
        doomed = {version} if version else set()
        for mv in client.search_model_versions(f"name='{quote_name(name)}'"):
            if mv.source == source:
                doomed.add(str(mv.version))
        for v in doomed:
            with contextlib.suppress(Exception):
                client.delete_model_version(name, v)
        if not existed and not client.search_model_versions(f"name='{quote_name(name)}'"):
            client.delete_registered_model(name)


def quote_name(name: str) -> str:
    """``name`` quoted for an MLflow search filter (``name='...'``)."""
    return name.replace("'", "\\'")


def load_model(
    uri: str, *, tracking_uri: str | None = None, map_location: str = "cpu"
) -> PrecipitationModel:
    """A registered or logged model (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
    ``runs:/ID/model``) or a package folder, ready for ``.sample`` and ``.reconstruct``
    (and their labelled twins ``.sample_array``...). ``uri`` is recorded on it (``.uri``).
    """
    if Path(uri).is_dir() and (Path(uri) / METADATA_FILE).exists():
        package = PrecipitationModel.load(uri, map_location)
        package.uri = str(uri)  # provenance of its labelled results
        return package
    if tracking_uri is not None:
        check_tracking(tracking_uri)
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    try:
        pyfunc = mlflow.pyfunc.load_model(uri)
    except MlflowException as exc:
        raise TrackingError(f"cannot load model {uri}: {exc.message}") from None
    wrapper = pyfunc.unwrap_python_model()
    if not isinstance(wrapper, PrecipitationPyfunc):
        raise TrackingError(f"{uri} is not a cloudburst model (it is {type(wrapper).__name__})")
    package = wrapper.loaded()
    if map_location != "cpu":
        package.model.to(map_location)
    package.uri = uri  # provenance of its labelled results (sample_array...)
    return package


# ------------------------------------------------------------------------------- figures


def log_figure(fig: Any, path: str, *, run_id: str | None = None, dpi: int = 100) -> None:
    """Log a matplotlib figure as a PNG artifact at ``path`` of ``run_id`` (or the active run).

    Saved as PNG through Agg whatever the pyplot backend; a pyplot figure is closed after.
    """
    if not path.lower().endswith(".png"):
        path = f"{path}.png"
    if run_id is None:
        active = mlflow.active_run()
        if active is None:
            raise TrackingError("log_figure needs an active MLflow run or a run_id")
        run_id = active.info.run_id
    MlflowClient().log_figure(run_id, fig, path, save_kwargs={"dpi": dpi, "format": "png"})
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        with contextlib.suppress(Exception):
            pyplot.close(fig)
