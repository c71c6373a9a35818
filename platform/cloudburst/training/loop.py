"""Framework-free training steps: the same code runs in a plain loop and inside Ray Train.

A model here is anything with ``loss(batch) -> (scalar tensor, dict of float metrics)``.
Optimisation calls it through :class:`LossModule`, whose ``forward`` is that loss, so the same
step works on the plain module and on a DistributedDataParallel wrapper of it (DDP synchronises
gradients only for calls through its own ``forward``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when enabled; a no-op on CPU (fp32 there)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass
class MeanMetrics:
    """Running means of scalar metrics, weighted by batch size."""

    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0

    def update(self, metrics: dict[str, float], n: int) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value) * n
        self.count += n

    def compute(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": v / max(self.count, 1) for k, v in self.sums.items()}


class LossModule(nn.Module):
    """``forward(batch)`` is ``model.loss(batch)``: what DDP wraps."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.model.loss(batch)


def train_steps(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device | None = None,
    mixed_precision: bool = False,
    max_steps: int | None = None,
    clip_norm: float | None = None,
) -> Iterator[dict[str, float]]:
    """One optimisation step per batch; yields each step's metrics (for progress and logging).

    ``model`` is a :class:`LossModule` (or DDP around one).
    """
    device = device or next(model.parameters()).device
    model.train()
    for step, batch in enumerate(batches):
        if max_steps is not None and step >= max_steps:
            return
        batch = to_device(batch, device)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, mixed_precision):
            loss, metrics = model(batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss became {value} at step {step}; metrics {metrics}")
        loss.backward()
        if clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        metrics = dict(metrics)
        metrics["batch_size"] = float(batch["x"].shape[0])
        yield metrics


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    device: torch.device | None = None,
    mixed_precision: bool = False,
) -> dict[str, float]:
    """Mean metrics of ``model.loss`` over ``batches`` (no gradients); ``model`` unwrapped."""
    core = model
    device = device or next(core.parameters()).device
    core.eval()
    mean = MeanMetrics()
    for batch in batches:
        batch = to_device(batch, device)
        with autocast(device, mixed_precision):
            _, metrics = core.loss(batch)
        mean.update(metrics, batch["x"].shape[0])
    core.train()
    return mean.compute()


@dataclass
class EarlyStopping:
    """Stop when the monitored value has not improved by ``min_delta`` for ``patience`` epochs."""

    patience: int = 10
    min_delta: float = 0.0
    best: float = math.inf
    bad_epochs: int = 0

    def step(self, value: float) -> bool:
        """Record an epoch's value; True when training should stop."""
        if value < self.best - self.min_delta:
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def state(self) -> dict[str, float]:
        return {"best": self.best, "bad_epochs": self.bad_epochs}
