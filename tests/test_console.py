"""The training console's pieces: the epoch line, what Ray's reports keep, progress bars."""

from __future__ import annotations

import math

from cloudburst.training import console


def test_the_epoch_line_has_the_losses_and_the_first_declared_metrics():
    report = {
        "train_loss": 0.0123456,
        "val_loss": 0.2,
        "val_qmse_top5": 2.41,
        "val_qmse_bin_3": 9.0,
        "val_active_units": 7.0,
        "val_mean_bias": 0.01,
        "val_wet_fraction": 0.3,
    }
    declared = [
        "val_qmse_top5",
        "val_missing",
        "val_active_units",
        "val_mean_bias",
        "val_wet_fraction",
    ]
    line = console.epoch_line(2, 20, report, declared, 812.4)
    assert line == (
        "epoch 3/20: train_loss 0.01235, val_loss 0.2, val_qmse_top5 2.41, "
        "val_active_units 7, val_mean_bias 0.01 | 812 samples/s"
    )
    # a metric the report lacks is skipped, a NaN rate left out
    assert (
        console.epoch_line(0, 1, {"val_loss": 1.0}, declared, math.nan) == "epoch 1/1: val_loss 1"
    )


def test_reports_keep_everything_but_per_bin_metrics():
    report = {"val_loss": 1.0, "val_qmse_bin_0": 3.0, "train_qmse_bin_12": 2.0, "epoch": 4}
    assert console.reported(report) == {"val_loss": 1.0, "epoch": 4}


def test_progress_bars_only_where_wanted(monkeypatch):
    assert isinstance(console.progress_bar(5, "x", enabled=False), console.Silent)
    monkeypatch.setenv("CLOUDBURST_PROGRESS", "0")
    assert isinstance(console.progress_bar(5, "x", enabled=True), console.Silent)
    assert console.bars_wanted() is False
    monkeypatch.setenv("CLOUDBURST_PROGRESS", "1")
    bar = console.progress_bar(3, "epoch 1/1", enabled=True)
    assert not isinstance(bar, console.Silent)
    bar.update(1)
    bar.close()


def test_a_sweeps_trial_counter_counts_endings_and_pickles(monkeypatch):
    import ray.cloudpickle as pickle

    from cloudburst.tuning.progress import TrialProgress

    counter = TrialProgress("bins")
    counter.on_trial_complete(1, [], None)
    counter.on_trial_complete(2, [], None)
    counter.on_trial_error(3, [], None)
    assert counter.ended == {"done": 2, "error": 1}
    assert counter.bar is not None  # made at the first ending (drawn only on a terminal)
    again = pickle.loads(pickle.dumps(counter))  # Tune saves its run config, callbacks too
    assert again.ended == {"done": 2, "error": 1} and again.bar is None
    counter.on_experiment_end([])
