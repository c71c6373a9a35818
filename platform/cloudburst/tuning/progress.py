"""A sweep's progress on the console: one bar counting trials as they end."""

from __future__ import annotations

from typing import Any

from ray import tune
from tqdm.auto import tqdm

__all__ = ["TrialProgress"]


class TrialProgress(tune.Callback):
    """Counts the trials that ended (finished, stopped early or failed) on a terminal (no bar
    in a log file), with how many of each so far. Picklable (Tune saves its run config): the
    bar is made at the first trial's end and left out of the pickled state."""

    def __init__(self, name: str, total: int | None = None) -> None:
        self.name, self.total = name, total
        self.ended = {"done": 0, "error": 0}
        self.bar: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "bar": None}

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended["done"] += 1
        self.step()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended["error"] += 1
        self.step()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.bar is not None:
            self.bar.close()

    def step(self) -> None:
        """One more trial ended."""
        if self.bar is None:
            self.bar = tqdm(total=self.total, desc=f"sweep {self.name}", unit="trial", disable=None)
        self.bar.set_postfix(self.ended)
        self.bar.update(1)
