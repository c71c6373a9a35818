"""Transformations: round trips on numpy and torch, state round trips, data ranges, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cloudburst.data import transforms
from cloudburst.data.ingest import StatsAccumulator
from cloudburst.data.transforms import (
    Chain,
    Identity,
    Scale,
    Sqrt,
    Transform,
    for_data,
    from_state,
    register,
)


def rain(n: int = 2000, seed: int = 0) -> np.ndarray:
    """Non-negative, mostly dry, heavy-tailed values (float64)."""
    rng = np.random.default_rng(seed)
    x = rng.gamma(0.6, 10.0, n) * (rng.random(n) < 0.4)
    x[:3] = [0.0, 0.0, 250.0]
    return x


def stats_of(x: np.ndarray):
    acc = StatsAccumulator()
    acc.add(x.astype(np.float32))
    return acc.finish(bins=10, units="mm/day")


TRANSFORMS = {
    "identity": lambda: Identity(),
    "sqrt": lambda: Sqrt(),
    "scale-unit": lambda: Scale(0.0, 250.0, "unit"),
    "scale-symmetric": lambda: Scale(-2.0, 80.0, "symmetric"),
    "chain": lambda: Chain(Sqrt(), Scale(0.0, math.sqrt(250.0), "symmetric")),
    "nested-chain": lambda: Chain(Scale(0.0, 10.0), Chain(Sqrt(), Identity()), Scale(0, 2)),
}


def as_torch(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.copy())


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_round_trip(name, backend):
    t = TRANSFORMS[name]()
    assert isinstance(t, Transform)
    x = rain()
    data = as_torch(x) if backend == "torch" else x
    y = t.forward(data)
    back = t.inverse(y)
    assert type(y) is type(data) and type(back) is type(data)
    assert tuple(y.shape) == x.shape
    back = back.numpy() if backend == "torch" else back
    np.testing.assert_allclose(back, x, rtol=1e-12, atol=1e-10)
    if name != "identity":
        assert not np.allclose(np.asarray(y), x)
    # monotone: order of values kept
    order = np.argsort(x, kind="stable")
    assert (np.diff(np.asarray(y)[order]) >= 0).all()


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_numpy_and_torch_agree(name):
    t = TRANSFORMS[name]()
    x = rain(seed=1)
    np.testing.assert_allclose(t.forward(as_torch(x)).numpy(), t.forward(x), rtol=1e-12)
    y = t.forward(x)
    np.testing.assert_allclose(t.inverse(as_torch(y)).numpy(), t.inverse(y), rtol=1e-12)
    x32 = torch.from_numpy(x.astype(np.float32))
    assert t.forward(x32).dtype == torch.float32


def test_reference_values():
    x = rain(seed=2)
    np.testing.assert_allclose(Sqrt().forward(x), np.sqrt(x))
    np.testing.assert_allclose(Sqrt().inverse(np.sqrt(x)), x)
    np.testing.assert_allclose(Scale(2.0, 6.0).forward(x), (x - 2.0) / 4.0)
    np.testing.assert_allclose(Scale(2.0, 6.0, "symmetric").forward(x), (x - 2.0) / 2.0 - 1.0)
    chain = Chain(Sqrt(), Scale(1.0, 3.0, "symmetric"))
    np.testing.assert_allclose(chain.forward(x), np.sqrt(x) - 2.0)
    # forward clamps negatives to 0 (no NaN), inverse of negatives is 0
    assert Sqrt().forward(np.array([-4.0]))[0] == 0.0
    assert Sqrt().inverse(np.array([-3.0]))[0] == 0.0
    assert float(Sqrt().forward(torch.tensor([-4.0]))[0]) == 0.0


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_state_round_trip(name):
    t = TRANSFORMS[name]()
    state = t.state()
    assert json.loads(json.dumps(state)) == state  # JSON-able
    rebuilt = from_state(json.loads(json.dumps(state)))
    assert type(rebuilt) is type(t)
    assert rebuilt.state() == state
    x = rain(seed=3)
    np.testing.assert_array_equal(rebuilt.forward(x), t.forward(x))
    y = t.forward(x)
    np.testing.assert_array_equal(rebuilt.inverse(y), t.inverse(y))


@pytest.mark.parametrize("scaling, low", [("unit", 0.0), ("symmetric", -1.0)])
@pytest.mark.parametrize("kind", ["none", "sqrt"])
def test_for_data_maps_zero_and_max_to_the_ends(scaling, low, kind):
    x = rain(seed=4)
    stats = stats_of(x)
    assert stats.max == pytest.approx(x.max())
    t = for_data(stats, scaling, kind)
    ends = t.forward(np.array([0.0, stats.max]))
    np.testing.assert_allclose(ends, [low, 1.0], atol=1e-12)
    y = t.forward(x)
    assert y.min() >= low - 1e-12 and y.max() <= 1.0 + 1e-12
    np.testing.assert_allclose(t.inverse(y), x, rtol=1e-6, atol=1e-9)
    if kind == "sqrt":  # a quarter of the max lands half-way (sqrt before scaling)
        mid = t.forward(np.array([stats.max / 4]))[0]
        assert mid == pytest.approx(low + (1.0 - low) * 0.5)
    # an explicit upper bound replaces the data's max
    t_up = for_data(stats, scaling, kind, upper=2 * stats.max)
    assert t_up.forward(np.array([2 * stats.max]))[0] == pytest.approx(1.0)
    assert t_up.forward(np.array([stats.max]))[0] < 1.0
    assert from_state(t.state()).state() == t.state()


def test_for_data_on_an_all_dry_store():
    stats = stats_of(np.zeros(50))
    assert stats.max == 0.0
    t = for_data(stats, "unit")
    np.testing.assert_allclose(t.forward(np.array([0.0, 1.0])), [0.0, 1.0])
    assert np.isfinite(for_data(stats, "symmetric", "sqrt").forward(np.zeros(3))).all()


def test_errors_for_bad_arguments():
    with pytest.raises(ValueError, match="high > low"):
        Scale(1.0, 1.0)
    with pytest.raises(ValueError, match="high > low"):
        Scale(5.0, 1.0)
    with pytest.raises(ValueError, match="target must be"):
        Scale(0.0, 1.0, "minmax")
    with pytest.raises(ValueError, match="unknown transformation kind 'log'"):
        from_state({"kind": "log"})
    with pytest.raises(ValueError, match="unknown transformation kind None"):
        from_state({})
    stats = stats_of(rain())
    with pytest.raises(ValueError, match="unknown transformation 'log'"):
        for_data(stats, "unit", "log")
    with pytest.raises(ValueError, match="target must be"):
        for_data(stats, "minmax")


class Log1p:
    """A custom kind, as a learnt transformation would register itself."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def forward(self, x):
        return np.log1p(x / self.scale) if isinstance(x, np.ndarray) else (x / self.scale).log1p()

    def inverse(self, y):
        return np.expm1(y) * self.scale if isinstance(y, np.ndarray) else y.expm1() * self.scale

    def state(self) -> dict:
        return {"kind": "test-log1p", "scale": self.scale}


def test_register_a_custom_kind(monkeypatch):
    monkeypatch.setattr(transforms, "_KINDS", dict(transforms._KINDS))  # restored afterwards
    with pytest.raises(ValueError, match="unknown transformation kind"):
        from_state({"kind": "test-log1p", "scale": 2.0})
    register("test-log1p", lambda s: Log1p(s["scale"]))
    t = Chain(Log1p(2.0), Scale(0.0, 5.0, "symmetric"))
    assert isinstance(Log1p(1.0), Transform)
    rebuilt = from_state(json.loads(json.dumps(t.state())))
    assert rebuilt.state() == t.state()
    x = rain(seed=5)
    np.testing.assert_allclose(rebuilt.forward(x), np.log1p(x / 2.0) / 2.5 - 1.0)
    np.testing.assert_allclose(rebuilt.inverse(rebuilt.forward(x)), x, atol=1e-9)
    xt = as_torch(x)
    np.testing.assert_allclose(rebuilt.inverse(rebuilt.forward(xt)).numpy(), x, atol=1e-9)
