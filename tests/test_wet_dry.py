"""Wet fraction and wet- and dry-spell length distributions of the evaluation.

Expected values are counted by hand (or by the plain Python loop :func:`reference_runs`),
never by the code under test.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from cloudburst.evaluation import comparisons
from cloudburst.evaluation.entries import Entry, generation_metrics
from cloudburst.evaluation.observations import FieldSummary, Observed, SpellAccumulator
from cloudburst.evaluation.publish import build_figures, nan_to_none
from cloudburst.evaluation.request import EvaluationRequest

SERIES = [0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 2.0, 0.0]


def one_cell(*series: list[float]) -> np.ndarray:
    """Windows (n, T, 1, 1) of one cell each."""
    return np.asarray(series, dtype=np.float64)[:, :, None, None]


def counts(acc: SpellAccumulator, kind: str) -> dict[int, float]:
    c = acc.wet if kind == "wet" else acc.dry
    return {int(k): float(c[k]) for k in np.flatnonzero(c)}


def reference_runs(w: np.ndarray, weights: np.ndarray, threshold: float) -> tuple:
    """Plain loops over windows, cells and steps: weighted run-length counts and wet share."""
    n, t, ny, nx = w.shape
    wet_runs: dict[int, float] = {}
    dry_runs: dict[int, float] = {}
    wet_w = valid_w = 0.0
    for i in range(n):
        for a in range(ny):
            for b in range(nx):
                state, run = None, 0
                for s in range(t + 1):
                    v = w[i, s, a, b] if s < t else np.nan
                    now = None if not np.isfinite(v) else bool(v > threshold)
                    if s < t and now is not None:
                        valid_w += weights[i]
                        wet_w += weights[i] * now
                    if now == state and now is not None:
                        run += 1
                        continue
                    if state is not None:
                        target = wet_runs if state else dry_runs
                        target[run] = target.get(run, 0.0) + weights[i]
                    state, run = now, 1
    return wet_runs, dry_runs, wet_w / valid_w


def test_hand_counted_series():
    acc = SpellAccumulator(8)
    acc.update(one_cell(SERIES))
    assert counts(acc, "wet") == {1: 1.0, 2: 1.0}
    assert counts(acc, "dry") == {1: 2.0, 3: 1.0}
    assert acc.wet_fraction() == pytest.approx(3 / 8)
    assert acc.mean_spell("wet") == pytest.approx(1.5)
    assert acc.mean_spell("dry") == pytest.approx(5 / 3)
    wet = np.zeros(8)
    wet[[0, 1]] = 0.5
    np.testing.assert_allclose(acc.distribution("wet"), wet)
    dry = np.zeros(8)
    dry[0], dry[2] = 2 / 3, 1 / 3
    np.testing.assert_allclose(acc.distribution("dry"), dry)


def test_threshold_is_strict_and_physical():
    acc = SpellAccumulator(8, wet_threshold=1.0)  # 1.0 itself is dry, only 2.0 is wet
    acc.update(one_cell(SERIES))
    assert counts(acc, "wet") == {1: 1.0}
    assert counts(acc, "dry") == {6: 1.0, 1: 1.0}
    assert acc.wet_fraction() == pytest.approx(1 / 8)


def test_drizzle_has_no_dry_spell():
    acc = SpellAccumulator(4)
    acc.update(one_cell([1e-6, 1e-5, 1e-6, 1e-7]))  # never an exact zero
    assert counts(acc, "wet") == {4: 1.0}
    assert counts(acc, "dry") == {}
    assert acc.wet_fraction() == 1.0
    assert np.isnan(acc.mean_spell("dry"))
    assert np.isnan(acc.distribution("dry")).all()


def test_weights_scale_contributions():
    acc = SpellAccumulator(8)
    acc.update(one_cell(SERIES, [1.0] * 8), np.array([3.0, 1.0]))
    assert counts(acc, "wet") == {1: 3.0, 2: 3.0, 8: 1.0}
    assert counts(acc, "dry") == {1: 6.0, 3: 3.0}
    assert acc.wet_fraction() == pytest.approx((3 * 3 + 8) / (3 * 8 + 8))
    assert acc.mean_spell("wet") == pytest.approx((3 * 1 + 3 * 2 + 8) / 7)


def test_nan_ends_runs_and_is_neither_wet_nor_dry():
    acc = SpellAccumulator(8)
    acc.update(one_cell([1.0, 1.0, np.nan, 1.0, 0.0, np.nan, np.nan, 0.0]))
    assert counts(acc, "wet") == {2: 1.0, 1: 1.0}
    assert counts(acc, "dry") == {1: 2.0}
    assert acc.wet_fraction() == pytest.approx(3 / 5)  # 5 valid pixels, 3 wet


def test_runs_never_join_cells_or_windows():
    acc = SpellAccumulator(3)
    acc.update(np.ones((2, 3, 2, 2)))  # 2 windows x 4 cells, all wet
    assert counts(acc, "wet") == {3: 8.0}
    assert counts(acc, "dry") == {}


def test_matches_plain_loops_on_random_fields():
    rng = np.random.default_rng(3)
    w = rng.gamma(0.4, 2.0, size=(7, 6, 3, 4))
    w[rng.random(w.shape) < 0.4] = 0.0
    w[rng.random(w.shape) < 0.1] = np.nan
    weights = rng.uniform(0.1, 2.0, size=7)
    acc = SpellAccumulator(6, wet_threshold=0.5)
    acc.update(w, weights)
    wet, dry, fraction = reference_runs(w, weights, 0.5)
    assert counts(acc, "wet") == pytest.approx(wet)
    assert counts(acc, "dry") == pytest.approx(dry)
    assert acc.wet_fraction() == pytest.approx(fraction)


def test_streaming_in_chunks_and_blocks_equals_one_call(monkeypatch):
    rng = np.random.default_rng(4)
    w = rng.gamma(0.4, 2.0, size=(9, 5, 4, 4))
    w[rng.random(w.shape) < 0.5] = 0.0
    w[rng.random(w.shape) < 0.05] = np.nan
    weights = rng.uniform(0.5, 1.5, size=9)
    whole = SpellAccumulator(5)
    whole.update(w, weights)
    chunked = SpellAccumulator(5)
    chunked.update(w[:4], weights[:4])
    chunked.update(w[4:], weights[4:])
    monkeypatch.setattr(SpellAccumulator, "BLOCK", 1)  # one window per block
    blocked = SpellAccumulator(5)
    blocked.update(w, weights)
    for other in (chunked, blocked):
        np.testing.assert_allclose(other.wet, whole.wet)
        np.testing.assert_allclose(other.dry, whole.dry)
        assert other.wet_fraction() == pytest.approx(whole.wet_fraction())


def test_window_length_is_checked():
    with pytest.raises(ValueError, match="steps"):
        SpellAccumulator(4).update(np.zeros((1, 5, 1, 1)))


def summary_of(w: np.ndarray, weights: np.ndarray | None = None) -> FieldSummary:
    edges = np.concatenate([[0.0], np.geomspace(0.01, 20.0, 30)])
    s = FieldSummary(edges, w.shape[1:], top_n=2)
    s.update(w.astype(np.float32), weights)
    return s


def test_field_summary_metrics_and_curves():
    obs_x = np.zeros((2, 8, 2, 2))
    obs_x[:, :, 0, 0] = SERIES  # one cell as SERIES, three always dry, in both windows
    drizzle = np.full((3, 8, 2, 2), 0.05)  # wet everywhere, no exact zero
    obs, gen = summary_of(obs_x), summary_of(drizzle)
    entry = Entry("drizzle", "model", {}, summary=gen)
    generation_metrics(entry, obs, q99=5.0)
    m = entry.metrics
    assert m["wet_fraction"] == pytest.approx(1.0)
    assert m["mean_wet_spell"] == pytest.approx(8.0)
    assert np.isnan(m["mean_dry_spell"])
    assert m["observed_wet_fraction"] == pytest.approx(3 / 32)
    # observed spells per window: wet {1, 2}; dry {1, 1, 3} and three cells' 8
    assert m["observed_mean_wet_spell"] == pytest.approx(1.5)
    assert m["observed_mean_dry_spell"] == pytest.approx((1 + 1 + 3 + 3 * 8) / 6)
    wet = entry.curves["wet_spells"]
    np.testing.assert_array_equal(wet["length"], np.arange(1, 9))
    np.testing.assert_allclose(wet["probability"], [0] * 7 + [1])
    np.testing.assert_allclose(wet["observed"], [0.5, 0.5] + [0] * 6)
    dry = entry.curves["dry_spells"]
    np.testing.assert_allclose(dry["observed"], [2 / 6, 0, 1 / 6, 0, 0, 0, 0, 3 / 6])
    assert json.dumps(nan_to_none(entry.to_json()))  # metrics.json carries them


def test_weighted_summary_wet_fraction():
    w = np.zeros((2, 4, 1, 1))
    w[0] = 1.0
    s = summary_of(w, np.array([3.0, 1.0]))
    assert s.spells.wet_fraction() == pytest.approx(3 / 4)


def lines_of(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines()]


def test_figure_has_one_line_per_entry_per_distribution():
    curves = {
        "observed": {"wet": [0.5, 0.5, 0], "dry": [0.6, 0, 0.4], "wet_fraction": 0.375},
        "m1": {"wet": [0, 0, 1.0], "dry": [np.nan] * 3, "wet_fraction": 1.0},
        "m2": {"wet": [1.0, 0, 0], "dry": [1.0, 0, 0], "wet_fraction": 0.5},
    }
    fig = comparisons.wet_dry_spells(curves, "wet and dry spells")
    wet_ax, dry_ax = fig.axes
    for ax in (wet_ax, dry_ax):
        assert len(ax.get_lines()) == 3
        assert ax.get_yscale() == "log"
    assert lines_of(wet_ax)[0] == "observed (wet fraction 0.375)"
    assert lines_of(wet_ax)[1] == "m1 (wet fraction 1.000)"
    assert fig.get_suptitle() == "wet and dry spells"
    with pytest.raises(ValueError, match="differ in length"):
        comparisons.wet_dry_spells({"x": {"wet": [1.0], "dry": [0.5, 0.5]}}, "t")


def test_build_figures_draws_wet_dry_spells(tmp_path):
    rng = np.random.default_rng(5)
    obs_x = rng.gamma(0.5, 2.0, size=(6, 4, 8, 8)).astype(np.float32)
    obs_x[obs_x < 0.5] = 0.0
    obs_summary = summary_of(obs_x)
    entries = []
    for label, scale in (("a v1", 1.0), ("b v2", 3.0)):
        e = Entry(label, "model", {}, summary=summary_of(rng.gamma(0.5, scale, (5, 4, 8, 8))))
        generation_metrics(e, obs_summary, q99=5.0)
        entries.append(e)
    obs = Observed(obs_x, "test", "test", "mm/h", str(tmp_path / "obs.zarr"), None, None)
    made = build_figures(entries, obs, obs_summary, {}, None, EvaluationRequest(data="obs"))
    fig = made["wet_dry_spells"]
    for ax in fig.axes[:2]:
        labels = lines_of(ax)
        assert len(labels) == 3
        assert labels[0].startswith("observed (wet fraction ")
        assert labels[1].startswith("a v1 (wet fraction ")
    assert "wet: > 0 mm/h" in fig.get_suptitle()
