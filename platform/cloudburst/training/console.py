"""What a training run shows on the console: one progress bar per epoch and one line after it.

Everything an epoch measures goes to MLflow (every metric, per-bin ones included); the
console gets the few that matter (:func:`epoch_line`: the losses, the family's first declared
metrics), Ray's reports get what checkpoint selection and sweeps read (:func:`reported`: no
per-bin metrics), and the progress bar counts steps with samples/s. Only rank 0 shows any of
it. Inside a Ray worker the bar is Ray's (``ray.experimental.tqdm_ray``), which the driver
draws in place; elsewhere it is tqdm's.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["PER_BIN", "bars_wanted", "epoch_line", "progress_bar", "reported"]

PER_BIN = "_bin_"  # a per-bin metric's name holds this (val_qmse_bin_17): MLflow only
LINE_METRICS = 3  # the family's declared metrics shown in the epoch line


def reported(report: Mapping[str, Any]) -> dict[str, Any]:
    """The epoch's report without its per-bin metrics: what Ray Train (and Tune) receive."""
    return {k: v for k, v in report.items() if PER_BIN not in k}


def epoch_line(
    epoch: int,
    epochs: int,
    report: Mapping[str, Any],
    declared: Iterable[str] = (),
    samples_per_s: float | None = None,
) -> str:
    """``epoch 3/20: train_loss 0.0123, val_loss 0.0131, val_qmse_top5 2.41, ... | 812
    samples/s``: the losses and the first :data:`LINE_METRICS` of the family's declared
    metrics that the report has (finite or not), in 4 significant digits."""
    keys = ["train_loss", "val_loss"]
    keys += [k for k in declared if k in report and k not in keys][:LINE_METRICS]
    parts = [f"{k} {float(report[k]):.4g}" for k in keys if k in report]
    line = f"epoch {epoch + 1}/{epochs}: " + ", ".join(parts)
    if samples_per_s is not None and math.isfinite(samples_per_s):
        line += f" | {samples_per_s:,.0f} samples/s"
    return line


def bars_wanted() -> bool:
    """Whether this (driver) process shows progress bars: on a terminal, unless
    ``CLOUDBURST_PROGRESS=0``; a log file (``ray job submit``'s, CI's) gets the epoch lines
    only."""
    return sys.stderr.isatty() and os.environ.get("CLOUDBURST_PROGRESS", "1") != "0"


def progress_bar(total: int | None, desc: str, *, enabled: bool) -> Any:
    """A step counter for one epoch (``update(n)``, ``set_postfix_str``, ``close``); a silent
    one when not ``enabled`` (ranks other than 0) or when ``CLOUDBURST_PROGRESS=0``."""
    if not enabled or os.environ.get("CLOUDBURST_PROGRESS", "1") == "0":
        return Silent()
    if in_ray_worker():
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        return ray_tqdm(total=total, desc=desc, unit="step")
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False)


def in_ray_worker() -> bool:
    """Whether this process runs a Ray actor (a Train worker), not a driver."""
    try:
        import ray

        return bool(ray.is_initialized()) and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001 - no Ray, or not connected
        return False


class Silent:
    """A progress bar that shows nothing."""

    def update(self, n: int = 1) -> None:
        """Nothing."""

    def set_postfix_str(self, text: str) -> None:
        """Nothing."""

    def close(self) -> None:
        """Nothing."""
