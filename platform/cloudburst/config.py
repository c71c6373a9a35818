"""Configs: pydantic models loaded from YAML with ``key=value`` overrides.

An invalid config fails before any work starts, with one line per problem naming the field,
the value given and what is allowed.
"""

from __future__ import annotations

import difflib
import math
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

import yaml
from pydantic import (
    BaseModel,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from cloudburst import compat
from cloudburst.models import registry
from cloudburst.models.diffusion import DiffusionConfig
from cloudburst.models.vae import VAEConfig
from cloudburst.schema import ConfigError, Strict

__all__ = [
    "ConfigError",
    "DataConfig",
    "DatasetJobConfig",
    "DiffusionConfig",
    "IngestConfig",
    "LoaderConfig",
    "RunConfig",
    "SplitConfig",
    "StorageConfig",
    "Strict",
    "SyntheticConfig",
    "TrainConfig",
    "TrainJobConfig",
    "VAEConfig",
    "WindowConfig",
    "apply_overrides",
    "job_config_class",
    "load_config",
    "read_tree",
    "validate",
]

M = TypeVar("M", bound=BaseModel)


class StorageConfig(Strict):
    """How to reach object storage (also settable by CLOUDBURST_ENDPOINT_URL / CLOUDBURST_ANON)."""

    endpoint_url: str | None = Field(
        None,
        description="endpoint of an S3- or GCS-compatible server; None: CLOUDBURST_ENDPOINT_URL, "
        "else the provider's own",
    )
    anon: bool | None = Field(
        None,
        description="anonymous (public bucket) access; None: CLOUDBURST_ANON, else with "
        "credentials",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="further fsspec storage options, applied last (they override those above)",
    )


class SyntheticConfig(Strict):
    """The stochastic precipitation generator behind the embedded default dataset."""

    ny: int = Field(48, ge=4, le=4096, description="grid rows (north to south)")
    nx: int = Field(48, ge=4, le=4096, description="grid columns (west to east)")
    nt: int = Field(1460, ge=1, description="time steps generated")
    freq: Literal["1D", "1h"] = Field(
        "1D", description="time step: 1D (daily, in mm/day) or 1h (hourly, in mm/h)"
    )
    start: str = Field("2001-01-01", description="time of the first step (ISO, e.g. 2001-01-01)")
    resolution_deg: float = Field(0.05, gt=0, description="grid spacing in degrees")
    center_lat: float = Field(
        20.5, ge=-90, le=90, description="latitude of the grid's centre in degrees"
    )
    center_lon: float = Field(
        75.5, ge=-180, le=360, description="longitude of the grid's centre in degrees"
    )
    seed: int = Field(
        0, description="seed of the generator: one config gives one dataset, bit for bit"
    )
    wet_fraction: float = Field(
        0.3,
        gt=0,
        lt=1,
        description="long-run fraction of wet pixels (the yearly mean wet probability)",
    )
    seasonal_amplitude: float = Field(
        0.6,
        ge=0,
        le=1,
        description="strength of the seasonal cycle of the wet probability, which peaks near day "
        "of year 200 (0: no seasons)",
    )
    spectral_slope: float = Field(
        3.0,
        gt=0,
        description="slope of the latent field's power-law spectrum (amplitude "
        "`k ** (-slope / 2)`): larger is smoother, with bigger rain areas",
    )
    persistence: float = Field(
        0.7,
        ge=0,
        lt=1,
        description="lag-1 correlation of the latent field between time steps (AR(1); 0: "
        "independent steps)",
    )
    advection: tuple[float, float] = Field(
        (0.6, 1.1),
        description="motion of the latent field per time step in grid cells, (rows, columns)",
    )
    gamma_shape: float = Field(
        0.7, gt=0, description="shape of the gamma distribution of wet amounts below tail_quantile"
    )
    gamma_scale: float = Field(
        8.0,
        gt=0,
        description="scale of the gamma distribution of wet amounts in mm/day (divided by 24 for "
        "hourly data)",
    )
    tail_quantile: float = Field(
        0.95,
        gt=0,
        lt=1,
        description="quantile of the gamma body above which wet amounts follow a generalised "
        "Pareto tail",
    )
    tail_shape: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="shape of the generalised Pareto tail: 0 is exponential, larger is heavier",
    )


class IngestConfig(Strict):
    """From a source archive (or the synthetic generator) to an analysis-ready Zarr store."""

    source: str | None = Field(None, description="archive URL; None generates synthetic data")
    target: str = Field(
        "outputs/demo/precip.zarr",
        description="path or URL of the Zarr store written; also the dataset's data.store unless "
        "that is set",
    )
    variable: str | None = Field(
        None,
        description="the source's precipitation variable; None: found by standard_name, name or "
        "units",
    )
    units: str | dict[str, str] | None = Field(
        None,
        description="units of the variable when the file lacks them; with variables, one for "
        "all or per variable ({name: units})",
    )
    variables: list[str] | None = Field(
        None,
        description="several variables (channels) into one store, on one grid; None: the one "
        "precipitation variable (variable)",
    )
    grid: str | None = Field(
        None,
        description="with variables: the variable whose grid the others are regridded onto "
        "(bicubic); needed when their grids differ",
    )
    missing_values: float | dict[str, float] | None = Field(
        None,
        description="with variables: the source value that means no data (e.g. 0 counts of a "
        "satellite image's missing tiles), one for all or per variable; it becomes NaN",
    )
    bbox: tuple[float, float, float, float] | None = Field(
        None,
        description="region kept, (W, S, E, N) in degrees of lon/lat (in x/y where the source "
        "has no lon/lat); None: the whole grid",
    )
    coarsen: int = Field(
        1,
        ge=1,
        description="mean over blocks of n x n cells (a block with any NaN is NaN); 1: the "
        "source's grid",
    )
    chunks: dict[str, int] | None = Field(
        None,
        description="Zarr chunk sizes by dimension (time, y, x); dimensions not given, or None: "
        "chunks of about 4 MB",
    )
    bins: int = Field(
        100,
        ge=2,
        description="bins of the value histogram kept in the store's statistics (evaluation's "
        "histograms use its edges)",
    )
    time_start: str | None = Field(
        None,
        description="first time ingested (ISO, in the source's calendar, inclusive); None: the "
        "start of the record",
    )
    time_end: str | None = Field(
        None,
        description="last time ingested (ISO, in the source's calendar, inclusive); None: the end "
        "of the record",
    )
    member: int | str | None = Field(
        None,
        description="ensemble member to read (a label of ensemble_member / realization / "
        "member, e.g. UKCP18's 1); required when the source has several",
    )

    @field_validator("bbox")
    @classmethod
    def _bbox_ordered(
        cls, v: tuple[float, float, float, float] | None
    ) -> tuple[float, float, float, float] | None:
        if v is not None and (v[0] >= v[2] or v[1] >= v[3]):
            raise ValueError("bbox must be W,S,E,N with W < E and S < N")
        return v

    @model_validator(mode="after")
    def _variables_consistent(self) -> IngestConfig:
        if self.variables is not None:
            if self.variable is not None:
                raise ValueError(
                    "give variable (one precipitation variable) or variables, not both"
                )
            if not self.variables or len(set(self.variables)) != len(self.variables):
                raise ValueError(f"variables must be distinct names (got {self.variables})")
            clash = sorted(set(self.variables) & {"time", "y", "x"})
            if clash:
                raise ValueError(f"variables {clash} clash with the store's dims time, y, x")
            if self.grid is not None and self.grid not in self.variables:
                raise ValueError(
                    f"grid {self.grid!r} must be one of the variables {self.variables}"
                )
            if isinstance(self.units, dict):
                unknown = sorted(set(self.units) - set(self.variables))
                if unknown:
                    raise ValueError(f"units given for {unknown}, not among {self.variables}")
            if isinstance(self.missing_values, dict):
                unknown = sorted(set(self.missing_values) - set(self.variables))
                if unknown:
                    raise ValueError(
                        f"missing_values given for {unknown}, not among {self.variables}"
                    )
        elif (
            self.grid is not None or isinstance(self.units, dict) or self.missing_values is not None
        ):
            raise ValueError("grid, per-variable units and missing_values need variables")
        return self

    @field_validator("chunks")
    @classmethod
    def _chunk_dims(cls, v: dict[str, int] | None) -> dict[str, int] | None:
        if v is not None:
            bad = sorted(set(v) - {"time", "y", "x"})
            if bad:
                raise ValueError(f"chunk dimensions must be among time, y, x (got {bad})")
            if any(int(n) < 1 for n in v.values()):
                raise ValueError("chunk sizes must be >= 1")
        return v


class WindowConfig(Strict):
    """Which (time, y, x) windows make samples."""

    length: int = Field(8, ge=1, description="time steps per window")
    size: int = Field(32, ge=1, description="pixels per side")
    stride: int = Field(8, ge=1, description="spatial stride in pixels")
    time_stride: int = Field(
        1, ge=1, description="keep every n-th valid window start in time (1: every step)"
    )
    doy: tuple[int, int] | None = Field(None, description="day-of-year range, e.g. (150, 300)")
    max_nan_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="largest fraction of NaN values a window may hold; the loader fills them "
        "with 0 and masks them (0: no NaN)",
    )

    @field_validator("doy")
    @classmethod
    def _doy_range(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not (1 <= v[0] <= 366 and 1 <= v[1] <= 366):
            raise ValueError("day-of-year bounds must lie in 1..366")
        return v


class SplitConfig(Strict):
    """How windows are split into train / validation / test."""

    scheme: Literal["years", "seasons", "frames", "none"] = Field(
        "seasons",
        description="years: by train_years and test_years; seasons: every n-th season to test; "
        "frames: every n-th time step (or test_times) to test; none: no test part",
    )
    train_years: tuple[int, int] | None = Field(
        None,
        description="years scheme: first and last year of train (inclusive); years in neither "
        "range are not used",
    )
    test_years: tuple[int, int] | None = Field(
        None, description="years scheme: first and last year of test (inclusive)"
    )
    every: int = Field(
        5, ge=2, description="seasons (frames) scheme: every n-th season (time step) goes to test"
    )
    test_times: list[str] | None = Field(
        None, description="frames scheme: these times (ISO) go to test instead of every n-th"
    )
    guard: int = Field(
        0,
        ge=0,
        description="frames scheme: time steps either side of a test frame kept out of train and "
        "val (near-duplicates of it)",
    )
    val_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="fraction of train's contiguous time blocks that become validation (0: no "
        "validation part)",
    )
    seed: int = Field(0, description="seed of the choice of validation blocks")

    @model_validator(mode="after")
    def _years_given(self) -> SplitConfig:
        if self.scheme == "years" and (self.train_years is None or self.test_years is None):
            raise ValueError("scheme 'years' needs train_years and test_years, e.g. [1981, 2010]")
        if self.scheme != "frames" and (self.test_times is not None or self.guard):
            raise ValueError("test_times and guard belong to scheme 'frames'")
        if self.test_times is not None and not self.test_times:
            raise ValueError("test_times is empty: give at least one time, or use every")
        for name in ("train_years", "test_years"):
            span = getattr(self, name)
            if span is not None and span[0] > span[1]:
                raise ValueError(f"{name} {list(span)} is reversed: give [first, last]")
        if self.train_years and self.test_years:
            (a, b), (c, d) = self.train_years, self.test_years
            if a <= d and c <= b:
                raise ValueError(
                    f"train_years {[a, b]} and test_years {[c, d]} overlap; make them disjoint"
                )
        return self


class LoaderConfig(Strict):
    batch_size: int = Field(32, ge=1, description="windows per batch, per training worker")
    num_workers: int = Field(
        0,
        ge=0,
        description="DataLoader worker processes of each training worker's train loader (0: "
        "load in the training process)",
    )
    cache_blocks: int = Field(8, ge=2, description="decoded chunks kept in memory per process")
    shuffle_buffer_blocks: int = Field(
        4,
        ge=1,
        description="time slabs of chunks per shuffle run: runs are visited in random order, "
        "windows shuffled within a run",
    )
    prefetch_requests: int = Field(
        16,
        ge=0,
        le=256,
        description="chunk reads kept in flight per loader process (0 or 1: one at a time)",
    )


class DataConfig(Strict):
    """A training dataset: an ingested store and how to cut it into samples."""

    store: str = Field(
        "outputs/demo/precip.zarr",
        description="path or URL of the ingested Zarr store; in a dataset job, ingest.target "
        "unless set",
    )
    windows: WindowConfig = Field(
        default_factory=WindowConfig, description="which (time, y, x) windows make samples"
    )
    split: SplitConfig = Field(
        default_factory=SplitConfig,
        description="how windows are split into train, validation and test",
    )
    loader: LoaderConfig = Field(
        default_factory=LoaderConfig,
        description="batches, loader processes and shuffling of the training data",
    )
    scaling: Literal["unit", "symmetric"] = Field(
        "unit",
        description="model-space range: unit maps the data's range onto [0, 1], symmetric onto "
        "[-1, 1]",
    )
    transform: Literal["none", "sqrt"] = Field(
        "none",
        description="fixed transformation before scaling: none, or sqrt (the square root of the "
        "physical values)",
    )
    input: str | None = Field(
        None, description="variable the model reads (x); None: the store's single variable"
    )
    target: str | None = Field(
        None,
        description="variable the model predicts (batch key target), same windows as input; "
        "None: no target (the input is reconstructed)",
    )

    @model_validator(mode="after")
    def _pair(self) -> DataConfig:
        if self.target is not None and self.input is None:
            raise ValueError("target needs input: name the variable the model reads")
        return self


class DatasetJobConfig(Strict):
    """Prepare a dataset: ingest an archive (or generate synthetic data) and index its windows.

    With no config at all this is the embedded default: synthetic data into a local store.
    """

    name: str = Field(
        "demo", description="name of the dataset, shown by the demo and in its ensemble's name"
    )
    synthetic: SyntheticConfig = Field(
        default_factory=SyntheticConfig,
        description="the synthetic generator, used when ingest.source is None",
    )
    ingest: IngestConfig = Field(
        default_factory=IngestConfig,
        description="the archive ingested (or none: synthetic data) and the store written",
    )
    data: DataConfig = Field(
        default_factory=DataConfig,
        description="how the store is cut into windows and split; its store is ingest.target "
        "unless set",
    )
    storage: StorageConfig = Field(
        default_factory=StorageConfig,
        description="object storage access for the source and the store",
    )

    @model_validator(mode="after")
    def _store_is_target(self) -> DatasetJobConfig:
        """The dataset reads the store this job writes unless told otherwise."""
        if "store" not in self.data.model_fields_set:
            self.data.store = self.ingest.target
        return self


class _Loader(yaml.SafeLoader):
    """YAML without implicit timestamps: ``2001-01-01`` stays the string the str fields want."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML: numbers, lists, null...)."""
    for item in overrides or []:
        if "=" not in item:
            example = f"{item}=VALUE" if re.fullmatch(r"[\w.]+", item) else "bins=64"
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. {example})")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"override '{item}' has an empty key")
        _set_path(tree, key.strip(), _yaml(raw) if raw != "" else "")
    return tree


_UNION_MEMBER = re.compile(r"float|int|str|bool|literal\[.*\]")


def _tags(model: type[BaseModel]) -> set[str]:
    """The values of a union member's tag field (``kind`` or ``type``)."""
    out: set[str] = set()
    for name in ("kind", "type"):
        field = model.model_fields.get(name)
        if field is not None and typing.get_origin(field.annotation) is Literal:
            out.update(str(a) for a in typing.get_args(field.annotation))
    return out


def _nodes(annotation: Any) -> list[Any]:
    """What a field holds: config models, and ``("items", [...])`` for a dict, list or tuple."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (dict, list, tuple) and args:
        value = args[-1] if origin is not tuple else args[0]
        return [("items", _nodes(value))]
    return [node for arg in args for node in _nodes(arg)]


def _fields_at(cls: type[BaseModel], loc: list[Any]) -> list[str]:
    """The field names of the section at ``loc`` of ``cls`` ([] where it cannot be told)."""
    current: list[Any] = [cls]
    for part in loc:
        following: list[Any] = []
        for node in current:
            if isinstance(node, tuple):
                following += node[1]
            elif isinstance(part, str) and part in node.model_fields:
                following += _nodes(node.model_fields[part].annotation)
        if not following:  # the tag of a union: model.vae..., space.X.grid...
            models = [n for n in current if not isinstance(n, tuple)]
            following = [m for m in models if part in _tags(m) or part == m.__name__] or []
            if not following and part in registry.names():
                following = [registry.family(str(part)).config]
        if not following:
            return []
        current = following
    return sorted({f for n in current if not isinstance(n, tuple) for f in n.model_fields})


def _unknown(cls: type[BaseModel] | None, loc: list[Any]) -> str:
    """The message of an unknown field, with the closest known name where one is close."""
    msg = "unknown field (check its spelling and section)"
    if cls is None or not loc or not isinstance(loc[-1], str):
        return msg
    known = _fields_at(cls, loc[:-1])
    close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
    if close:
        return f"unknown field; did you mean {close[0]!r}?"
    if known:
        return f"{msg}; known here: {', '.join(known)}"
    return msg


def _describe(errors: list[dict[str, Any]], source: str, cls: type[BaseModel] | None = None) -> str:
    lines = [f"invalid config ({source}):"]
    kinds = set(registry.names(plugins=False))
    for err in errors:
        raw = list(err["loc"])
        loc = list(raw)
        if len(loc) > 1 and loc[0] == "model" and loc[1] in kinds:
            del loc[1]  # the union's tag: model.loss, not model.vae.loss
        # a plain union's member names (train.dry_threshold, not ...dry_threshold.float)
        loc = [p for p in loc if not (isinstance(p, str) and _UNION_MEMBER.fullmatch(p))]
        field = ".".join(str(p) for p in loc) or "(top level)"
        given = err.get("input")
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = _unknown(cls, raw)
        elif err["type"] == "missing":
            lines.append(f"  - {field}: missing; this field is required")
            continue
        elif err["type"] == "finite_number":
            msg = "must be a finite number (nan and inf are not allowed)"
        elif err["type"] == "literal_error":
            allowed = err.get("ctx", {}).get("expected", "")
            msg = f"allowed: {allowed}"
        elif err["type"] == "union_tag_invalid":
            ctx = err.get("ctx", {})
            given = ctx.get("tag", given)
            if loc == ["model"]:
                msg = f"unknown model kind; known: {', '.join(sorted(kinds))}"
            else:  # another tagged section: a sweep's scheduler.kind, a domain's type
                tag = str(ctx.get("discriminator", "kind")).strip("'")
                msg = f"unknown {tag}; allowed: {ctx.get('expected_tags', '')}"
        lines.append(f"  - {field}: got {given!r}; {msg}")
    return "\n".join(lines)


def validate(cls: type[M], tree: dict[str, Any], source: str = "config") -> M:
    """``cls`` from ``tree``, or a :class:`ConfigError` with one line per problem."""
    registry.load_plugins()  # families of other packages join the model union first
    try:
        return cls.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors(), source, cls)) from None


def _read_config(path: str | Path) -> str:
    """The text of a config file, or a :class:`ConfigError` saying what to give instead."""
    if "\x00" in str(path):
        raise ConfigError(
            f"cannot read config {str(path)!r}: the path contains a NUL byte (\\x00); "
            "give the file's path without it"
        )
    try:
        return Path(path).read_text()
    except IsADirectoryError:
        raise ConfigError(
            f"cannot read config {path}: Is a directory; give the path of a YAML file"
        ) from None
    except FileNotFoundError:
        raise ConfigError(
            f"cannot read config {path}: No such file; check the path (relative to {Path.cwd()})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read config {path}: not UTF-8 text; give a YAML file") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what: ``line 3, column 7: expected ',' or ']'``."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(exc).split())
    where = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and start is not None:
        where += f" ({context} started at line {start.line + 1}, column {start.column + 1})"
    return where


def read_tree(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML (or JSON) config file holds, or a :class:`ConfigError` naming what
    is wrong with the file (missing, a folder, not YAML, not a mapping) and what to give."""
    text = _read_config(path)
    try:
        loaded = _yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {_yaml_problem(exc)}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(
            f"config {path} must be a mapping of fields (`key: value` lines), "
            f"not a {type(loaded).__name__}"
        )
    return loaded or {}


def load_config(
    cls: type[M], path: str | Path | None = None, overrides: list[str] | None = None
) -> M:
    """Load ``cls`` from a YAML file (or its defaults if ``path`` is None) plus overrides."""
    tree = read_tree(path) if path is not None else {}
    source = str(path) if path is not None else "embedded defaults"
    tree = apply_overrides(tree, overrides)
    return validate(cls, tree, source)


class TrainConfig(Strict):
    """Optimisation and scaling (Ray Train)."""

    epochs: int = Field(
        100, ge=1, description="epochs to train at most (early stopping may end it sooner)"
    )
    max_steps_per_epoch: int | None = Field(
        None,
        ge=1,
        description="training batches per epoch and worker at most; None: the whole train split",
    )
    max_val_batches: int | None = Field(
        None, ge=1, description="validation batches per epoch (None: the whole split)"
    )
    lr: float | None = Field(
        None,
        gt=0,
        description="None: the model family's default (VAE: 5e-5 for quantized "
        "losses, else 1e-5; diffusion: 1e-4)",
    )
    betas: tuple[float, float] = Field(
        (0.9, 0.999), description="Adam's coefficients (beta1, beta2)"
    )
    patience: int = Field(10, ge=1, description="early stopping on validation loss")
    seed: int = Field(
        0,
        description="seed of the model's initialisation (plus the worker's rank), the shuffling "
        "and the auto dry threshold's samples",
    )
    workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel processes)")
    cpus_per_worker: float = Field(
        1.0,
        gt=0,
        description="CPUs each worker reserves; its torch threads: this rounded down, at least 1",
    )
    use_gpu: bool | None = Field(None, description="None: use GPUs when the cluster has them")
    gpus_per_worker: float | None = Field(
        None,
        gt=0,
        le=8,
        description="GPUs per worker when on GPUs (a fraction shares one GPU between small "
        "models, e.g. a sweep's trials); None: one",
    )
    mixed_precision: bool = Field(
        True, description="bf16 autocast on CUDA devices (training and validation); off on the CPU"
    )
    max_failures: int = Field(
        2,
        ge=0,
        description="restarts of a failed worker group from the last checkpoint (0: fail at once)",
    )
    checkpoints_to_keep: int = Field(
        2, ge=1, description="checkpoints kept in the run's folder, the best by validation loss"
    )
    dry_threshold: Literal["auto", "none"] | float = Field(
        "auto",
        description="physical values below it are exactly 0 in everything the packaged model "
        "makes: auto (the generated wet fraction matches the observed one on validation "
        "windows), none, or a value in the store's units",
    )
    dry_threshold_samples: int = Field(
        16, ge=1, le=4096, description="generated windows the auto dry threshold is chosen on"
    )

    @field_validator("dry_threshold")
    @classmethod
    def _dry_threshold_value(cls, v: str | float) -> str | float:
        if isinstance(v, float) and not (math.isfinite(v) and v >= 0):
            raise ValueError("dry_threshold must be auto, none or a finite value >= 0")
        return v


class RunConfig(Strict):
    """Where runs, checkpoints and models go."""

    name: str = Field(
        "vae-demo",
        description="Ray Train and MLflow run name; re-running the same name resumes from its "
        "last checkpoint",
    )
    storage_path: str = Field(
        "outputs/ray",
        description="where runs and checkpoints go (under run.name): a local folder, s3:// or "
        "gs:// URL",
    )
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; None: MLFLOW_TRACKING_URI, else a local SQLite store "
        "in outputs/mlflow",
    )
    experiment: str = Field("cloudburst", description="MLflow experiment the run is logged in")
    registered_model: str = Field(
        "cloudburst-vae", description="name the trained model is registered under in MLflow"
    )
    system_metrics_interval: float | None = Field(
        10.0, gt=0, description="seconds between MLflow system-metrics samples; None: off"
    )


def _model_kind(value: Any) -> str:
    """The tag of a model section: its ``kind`` (``vae`` when a mapping names none)."""
    if isinstance(value, BaseModel):
        return str(getattr(value, "kind", ""))
    if isinstance(value, dict):
        return str(value.get("kind", "vae"))
    return ""


_MODEL_DESCRIPTION = (
    "one registered model family's section, told apart by model.kind (vae, diffusion...)"
)


def _model_union() -> Any:
    """``model``: one member per registered family, told apart by ``kind``."""
    members = tuple(Annotated[f.config, Tag(f.name)] for f in registry.families(plugins=False))
    return Annotated[Union[members], Discriminator(_model_kind)]  # noqa: UP007


def _legacy_model_section(tree: Any) -> Any:
    """The earlier spelling ``model: NAME`` with a top-level section ``NAME:`` (or a bare
    ``vae:`` section) becomes ``model: {kind: NAME, ...}``; a top-level section named after
    the model's kind is merged into it (so ``vae.loss=rec`` still overrides). Sections of
    other families are left in place, and fail as unknown fields."""
    if not isinstance(tree, dict):
        return tree
    tree = dict(tree)
    model = tree.get("model")
    if model is None:
        kind = "vae"
        section: dict[str, Any] = {}
    elif isinstance(model, str):
        kind, section = model, {}
    elif isinstance(model, dict):
        kind, section = str(model.get("kind", "vae")), dict(model)
    else:
        return tree
    legacy = tree.get(kind)
    if model is None and legacy is None:
        return tree
    if legacy is not None:
        if not isinstance(legacy, dict):
            return tree
        tree.pop(kind)
        section = {**legacy, **section}
    tree["model"] = {**section, "kind": kind}
    return tree


class TrainJobConfig(Strict):
    """A training job: data, model, optimisation, run; `jobs/train.py --config ...`.

    ``model`` is the section of one registered model family, told apart by ``model.kind``
    (``vae``, ``diffusion``, or any family added with ``cloudburst.models.registry``).
    """

    data: DataConfig = Field(
        default_factory=DataConfig,
        description="the training dataset: a store and how it is cut into samples",
    )
    model: VAEConfig | DiffusionConfig = Field(  # see _model_union
        default_factory=VAEConfig, description=_MODEL_DESCRIPTION
    )
    train: TrainConfig = Field(
        default_factory=TrainConfig,
        description="optimisation, Ray Train workers, failures and checkpoints",
    )
    run: RunConfig = Field(
        default_factory=RunConfig, description="where runs, checkpoints and models go"
    )
    storage: StorageConfig = Field(
        default_factory=StorageConfig,
        description="object storage access for data.store and run.storage_path",
    )

    @model_validator(mode="before")
    @classmethod
    def _earlier_spelling(cls, tree: Any) -> Any:
        return _legacy_model_section(tree)

    @model_validator(mode="after")
    def _family_takes_the_data(self) -> TrainJobConfig:
        check = registry.family(self.model.kind).check_data
        reason = check(self.data) if check is not None else None
        if reason:
            raise ValueError(reason)
        return self

    @property
    def family(self) -> registry.ModelFamily:
        """The registry entry of the model this job trains."""
        return registry.family(self.model.kind)

    def learning_rate(self) -> float:
        """``train.lr``, else the family's default for this config."""
        if self.train.lr is not None:
            return self.train.lr
        return self.family.default_learning_rate(self.model)


def _rebuild_model_union() -> None:
    # the description rides on the annotation: replace_model_field builds a new FieldInfo
    described = Annotated[_model_union(), Field(description=_MODEL_DESCRIPTION)]
    compat.replace_model_field(TrainJobConfig, "model", described, VAEConfig)


_rebuild_model_union()
registry.on_change(_rebuild_model_union)


def job_config_class(path: str | Path) -> type[BaseModel]:
    """The config model a YAML file is written for: a sweep (it names ``space`` and
    ``base``), a training job (it names ``train``, ``model``, ``vae`` or ``run``) or a dataset
    job. A Ray Serve deploy file (it names ``applications``) is refused with how to start it."""
    try:
        tree = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {str(path)!r}: {exc}") from None
    if isinstance(tree, dict) and "applications" in tree:
        raise ConfigError(
            f"{path} is a Ray Serve deploy config, not a job config: start it with "
            f"`serve run {path}` (or `serve deploy {path}` onto a running cluster)"
        )
    if isinstance(tree, dict) and {"space", "base"} <= set(tree):
        from cloudburst.tuning.config import SweepConfig

        return SweepConfig
    if isinstance(tree, dict) and {"train", "model", "run", *registry.names()} & set(tree):
        return TrainJobConfig
    return DatasetJobConfig
