"""Statistics a model is made with come from its training split only: the test years never
leak into its scaling maximum, quantiles or histogram bins."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from cloudburst.config import TrainJobConfig
from cloudburst.data.ingest import ingest, open_store
from cloudburst.data.samples import split_stats


def test_training_statistics_leave_the_test_years_out(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.gamma(0.6, 4.0, (3 * 365, 8, 8)).astype("float32")
    values[rng.random(values.shape) < 0.5] = 0.0
    values[900, 3, 3] = 999.0  # a storm in the test year
    times = pd.date_range("2001-01-01", periods=len(values), freq="1D")
    ds = xr.Dataset(
        {"pr": (("time", "y", "x"), values, {"units": "mm/day"})},
        coords={"time": times, "y": 1000.0 * np.arange(8), "x": 1000.0 * np.arange(8)},
    )
    store = str(tmp_path / "s.zarr")
    ingest(ds, store, progress=False)
    cfg = TrainJobConfig.model_validate(
        {
            "data": {
                "store": store,
                "windows": {"length": 4, "size": 8, "stride": 8},
                "split": {
                    "scheme": "years",
                    "train_years": [2001, 2002],
                    "test_years": [2003, 2003],
                    "val_fraction": 0.0,
                },
            }
        }
    )
    stats, scope = split_stats(cfg)
    _, whole = open_store(store)
    train = values[times.year <= 2002]
    assert whole.max == pytest.approx(999.0)
    assert stats.max == pytest.approx(float(train.max()))
    assert stats.quantile(0.99) == pytest.approx(float(np.quantile(train, 0.99)), rel=1e-5)
    assert stats.histogram_edges[-1] == pytest.approx(float(train.max()))
    assert stats.count == train.size and stats.bins == whole.bins
    assert scope.startswith(f"train split: {len(train)} of {len(values)} time steps")
