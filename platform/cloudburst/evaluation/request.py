"""What an evaluation is asked to do, and the error it raises when it cannot.

The lowest module of the evaluation engine (:mod:`cloudburst.evaluation.evaluate`): the
observations, the scoring of models and stores and the publishing all import it, none of
them is imported by it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from cloudburst.config import StorageConfig

__all__ = ["EvaluationError", "EvaluationRequest"]


class EvaluationError(ValueError):
    """The evaluation cannot run as asked; the message names the problem and the fix."""


class EvaluationRequest(BaseModel):
    """What to evaluate, against which data, and how much of it."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    models: list[str] = Field(default_factory=list, description="models:/NAME@ALIAS or /VERSION")
    ensembles: list[str] = Field(default_factory=list, description="complete ensemble stores")
    data: str = Field(description="the Cloudburst store of observations")
    split: str = Field("test", description="PART[@SCHEME]; no scheme: the training run's split")
    out: str = "outputs/evaluation"
    limit: int | None = Field(2000, ge=1, description="observed windows, evenly spread")
    samples: int = Field(2000, ge=10, description="generated windows per model")
    members: int = Field(16, ge=2, le=1000, description="conditional members per window")
    thresholds: tuple[float, ...] = Field((0.95, 0.99), description="training quantile levels")
    periods: tuple[float, ...] = (10, 100, 1000, 10000)
    top_n: int = Field(20, ge=2)
    low_threshold: float = Field(1.0, gt=0, description="upper end of the low-intensity panel")
    wet_threshold: float = Field(
        0.0, ge=0, description="a pixel is wet above it (physical units; 0: any non-zero value)"
    )
    seed: int = 0
    chunk_mb: float = Field(64.0, gt=0, description="memory per verification tile")
    bootstrap: int = Field(100, ge=10)
    batch_size: int = Field(64, ge=1)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    experiment: str = "cloudburst-evaluation"
    run_name: str | None = None
    log_to_mlflow: bool = True
