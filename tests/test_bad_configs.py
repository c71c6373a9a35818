"""Bad job configs, loaded as the jobs load them (``load_config``: a YAML file plus
``key=value`` overrides): each is refused with a :class:`ConfigError` whose message names the
field, the value given and what is allowed (or the fix), never a raw pydantic dump.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from cloudburst.config import (
    ConfigError,
    DatasetJobConfig,
    IngestConfig,
    TrainJobConfig,
    load_config,
)
from cloudburst.ensembles.request import EnsembleRequest
from cloudburst.evaluation.request import EvaluationRequest
from cloudburst.tuning.config import SweepConfig

GE = "greater than or equal to"
FINITE = "must be a finite number (nan and inf are not allowed)"
SWEEP = """\
name: tiny
base: train.yaml
space:
  train.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
"""
ENSEMBLE = "model: models:/m/1\nmembers: 4\noutput: o.zarr\n"
EVALUATION = "models: [models:/m/1]\ndata: precip.zarr\n"
# EvaluationRequest is a plain pydantic model that still takes nan and inf for its floats


def case(
    cls: type[BaseModel],
    text: str | None,
    overrides: list[str],
    error: type[Exception],
    words: list[str],
    **marks: Any,
) -> Any:
    """One bad config: ``cls`` from the YAML ``text`` (None: no file) and ``overrides``."""
    first = (text or "").partition("\n")[0]
    label = f"{cls.__name__}:{' '.join(overrides) or first}"[:80]
    return pytest.param(cls, text, overrides, error, words, id=label, **marks)


CASES = [
    # ---------------------------------------------------------------- training job
    case(TrainJobConfig, None, ["train.lr=nan"], ConfigError, ["train.lr", "'nan'", FINITE]),
    case(TrainJobConfig, None, ["train.lr=.inf"], ConfigError, ["train.lr", "got inf", FINITE]),
    case(TrainJobConfig, None, ["train.betas=[0.9, .nan]"], ConfigError, ["train.betas.1", FINITE]),
    case(
        TrainJobConfig,
        None,
        ["train.cpus_per_worker=-1"],
        ConfigError,
        ["train.cpus_per_worker", "got -1", "greater than 0"],
    ),
    case(TrainJobConfig, None, ["train.epochs=0"], ConfigError, ["train.epochs", "got 0", GE]),
    case(
        TrainJobConfig,
        None,
        ["train.dry_threshold=-0.5"],
        ConfigError,
        ["train.dry_threshold", "-0.5", "auto, none or a finite value >= 0"],
    ),
    case(
        TrainJobConfig,
        None,
        ["run.system_metrics_interval=.inf"],
        ConfigError,
        ["run.system_metrics_interval", FINITE],
    ),
    case(
        TrainJobConfig,
        "train:\n  epoch: 3\n",
        [],
        ConfigError,
        ["train.epoch", "got 3", "unknown field", "did you mean 'epochs'"],
    ),
    case(
        TrainJobConfig,
        "train:\n  epochs: many\n",
        [],
        ConfigError,
        ["train.epochs", "'many'", "valid integer"],
    ),
    case(
        TrainJobConfig,
        "model:\n  kind: gan\n",
        [],
        ConfigError,
        ["model", "'gan'", "unknown model kind; known: diffusion, ", "vae"],
    ),
    case(
        TrainJobConfig,
        "model:\n  kind: diffusion\n  lambda_min: -.inf\n",
        [],
        ConfigError,
        ["model.lambda_min", "got -inf", FINITE],
    ),
    case(TrainJobConfig, "model:\n  los: rec\n", [], ConfigError, ["model.los", "'loss'"]),
    case(
        TrainJobConfig,
        "data:\n  split:\n    scheme: years\n",
        [],
        ConfigError,
        ["data.split", "scheme 'years' needs train_years and test_years", "[1981, 2010]"],
    ),
    case(
        TrainJobConfig,
        "data:\n  split: {scheme: years, train_years: [2000, 2010], test_years: [2005, 2012]}\n",
        [],
        ConfigError,
        ["data.split", "overlap", "make them disjoint"],
    ),
    case(
        TrainJobConfig,
        None,
        ["data.scaling=minmax"],
        ConfigError,
        ["data.scaling", "'minmax'", "allowed", "'unit'", "'symmetric'"],
    ),
    # ---------------------------------------------------------------- dataset (ingest) job
    case(
        DatasetJobConfig,
        None,
        ["synthetic.wet_fraction=nan"],
        ConfigError,
        ["synthetic.wet_fraction", "'nan'", FINITE],
    ),
    case(
        DatasetJobConfig,
        None,
        ["synthetic.center_lat=.inf"],
        ConfigError,
        ["synthetic.center_lat", "got inf", FINITE],
    ),
    case(DatasetJobConfig, None, ["ingest.bbox=[0, 0, .inf, 1]"], ConfigError, ["bbox.2", FINITE]),
    case(
        DatasetJobConfig,
        None,
        ["ingest.bbox=[5, 0, 1, 1]"],
        ConfigError,
        ["ingest.bbox", "W,S,E,N with W < E and S < N"],
    ),
    case(DatasetJobConfig, None, ["ingest.coarsen=-2"], ConfigError, ["ingest.coarsen", "-2", GE]),
    case(
        DatasetJobConfig,
        None,
        ["ingest.chunks={t: 10}"],
        ConfigError,
        ["ingest.chunks", "must be among time, y, x", "['t']"],
    ),
    case(
        DatasetJobConfig,
        None,
        ["data.windows.max_nan_fraction=nan"],
        ConfigError,
        ["data.windows.max_nan_fraction", FINITE],
    ),
    case(
        DatasetJobConfig,
        None,
        ["syntheticc.nt=30"],
        ConfigError,
        ["syntheticc", "unknown field", "did you mean 'synthetic'"],
    ),
    case(
        DatasetJobConfig,
        None,
        ["data.loader.batchsize=4"],
        ConfigError,
        ["data.loader.batchsize", "did you mean 'batch_size'"],
    ),
    case(
        DatasetJobConfig,
        "synthetic:\n  freq: 2h\n",
        [],
        ConfigError,
        ["synthetic.freq", "'2h'", "allowed: '1D' or '1h'"],
    ),
    case(
        DatasetJobConfig,
        "data:\n  windows:\n    doy: [0, 400]\n",
        [],
        ConfigError,
        ["data.windows.doy", "day-of-year bounds must lie in 1..366"],
    ),
    case(
        DatasetJobConfig,
        "name: demo\n",
        ["name.first=x"],
        ConfigError,
        ["override 'name.first'", "'name' is a value, not a section"],
    ),
    case(
        DatasetJobConfig,
        "- ingest\n- data\n",
        [],
        ConfigError,
        ["must be a mapping of fields", "not a list"],
    ),
    case(
        DatasetJobConfig,
        "ingest: {bins: [1, 2\n",
        [],
        ConfigError,
        ["not valid YAML", "line 2", "flow sequence started at line 1"],
    ),
    case(IngestConfig, None, ["coarsn=2"], ConfigError, ["coarsn", "did you mean 'coarsen'"]),
    case(IngestConfig, None, ["bins=1"], ConfigError, ["bins", "got 1", f"{GE} 2"]),
    # ---------------------------------------------------------------- sweep
    case(
        SweepConfig,
        "",
        [],
        ConfigError,
        ["name: missing", "base: missing", "space: missing", "required"],
    ),
    case(
        SweepConfig,
        SWEEP,
        ["name=my sweep"],
        ConfigError,
        ["name", "'my sweep'", "should match pattern"],
    ),
    case(
        SweepConfig,
        "name: s\nbase: b.yaml\nspace: {}\n",
        [],
        ConfigError,
        ["space", "at least 1 item"],
    ),
    case(
        SweepConfig,
        SWEEP.replace("low: 1.0e-4", "low: .nan"),
        [],
        ConfigError,
        ["space.train.lr", "low", "got nan", FINITE],
    ),
    case(
        SweepConfig,
        SWEEP,
        ["scheduler={kind: asha, reduction_factor: .inf}"],
        ConfigError,
        ["scheduler", "reduction_factor", "got inf", FINITE],
    ),
    case(
        SweepConfig,
        SWEEP,
        ["objective.bias_bound=.nan"],
        ConfigError,
        ["objective.bias_bound", FINITE],
    ),
    case(
        SweepConfig,
        SWEEP,
        ["resources.gpus_per_worker=.inf"],
        ConfigError,
        ["resources.gpus_per_worker", FINITE],
    ),
    case(SweepConfig, SWEEP, ["samples=0"], ConfigError, ["samples", "got 0", f"{GE} 1"]),
    case(
        SweepConfig,
        SWEEP,
        ["search.algorithm=grid"],
        ConfigError,
        ["grid domains only", "train.lr", "use algorithm random"],
    ),
    case(
        SweepConfig,
        SWEEP,
        ["scheduler.kind=hyperband"],
        ConfigError,
        ["scheduler", "'hyperband'", "unknown kind; allowed: 'asha', 'none'"],
    ),
    case(
        SweepConfig,
        SWEEP.replace("type: loguniform", "type: normal"),
        [],
        ConfigError,
        ["space.train.lr", "'normal'", "unknown type", "'loguniform'"],
    ),
    case(
        SweepConfig,
        SWEEP,
        ["schedular.kind=asha"],
        ConfigError,
        ["schedular", "did you mean 'scheduler'"],
    ),
    # ---------------------------------------------------------------- ensemble request
    case(
        EnsembleRequest,
        "model: models:/m/1\noutput: o.zarr\n",
        [],
        ConfigError,
        ["members: missing", "required"],
    ),
    case(EnsembleRequest, ENSEMBLE, ["members=0"], ConfigError, ["members", "got 0", f"{GE} 1"]),
    case(
        EnsembleRequest,
        ENSEMBLE,
        ["scenario.threshold=.nan"],
        ConfigError,
        ["scenario.threshold", "got nan", "finite"],
    ),
    case(
        EnsembleRequest,
        ENSEMBLE,
        ["scenario.kind=forecast"],
        ConfigError,
        ["scenario", "a forecast needs scenario.condition", "{data: STORE"],
    ),
    case(
        EnsembleRequest,
        ENSEMBLE,
        ["modle=models:/m/2"],
        ConfigError,
        ["modle", "did you mean 'model'"],
    ),
    case(
        EnsembleRequest,
        ENSEMBLE,
        ["scenario.kind=drizzle"],
        ConfigError,
        ["scenario.kind", "'drizzle'", "allowed", "'unconditional'", "'extreme'"],
    ),
    # ---------------------------------------------------------------- evaluation request
    case(EvaluationRequest, "models: [models:/m/1]\n", [], ConfigError, ["data: missing"]),
    case(
        EvaluationRequest, EVALUATION, ["members=1"], ConfigError, ["members", "got 1", f"{GE} 2"]
    ),
    case(
        EvaluationRequest,
        EVALUATION,
        ["modelz=[models:/m/2]"],
        ConfigError,
        ["modelz", "did you mean 'models'"],
    ),
    case(
        EvaluationRequest,
        EVALUATION,
        ["chunk_mb=.inf"],
        ConfigError,
        ["chunk_mb", "finite"],
    ),
    case(
        EvaluationRequest,
        EVALUATION,
        ["low_threshold=nan"],
        ConfigError,
        ["low_threshold", "finite"],
    ),
]


@pytest.mark.parametrize(("cls", "text", "overrides", "error", "words"), CASES)
def test_bad_config_is_refused_with_what_to_change(
    cls: type[BaseModel],
    text: str | None,
    overrides: list[str],
    error: type[Exception],
    words: list[str],
    tmp_path: Path,
) -> None:
    path = None
    if text is not None:
        path = tmp_path / "config.yaml"
        path.write_text(text)
    with pytest.raises(error) as err:
        load_config(cls, path, overrides)
    message = str(err.value)
    missing = [w for w in words if w not in message]
    assert not missing, f"{missing} not in: {message}"
    assert "errors.pydantic.dev" not in message and "[type=" not in message, message
