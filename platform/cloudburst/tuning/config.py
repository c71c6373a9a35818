"""What a sweep config holds (``jobs/sweep.py --config jobs/configs/sweep-*.yaml``).

A sweep trains one model per trial with the training job's own code, the base training
config changed at the trial's point of the search space::

    name: sweep-vae-demo
    base: jobs/configs/vae-demo.yaml          # a training config
    overrides: [train.epochs=4]               # applied to the base before every trial
    space:
      model.bins: {type: grid, values: [25, 50]}
      train.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
    search: {algorithm: random, seed: 0}      # random | grid | optuna (TPE)
    scheduler: {kind: asha, grace_period: 1, reduction_factor: 2}   # or {kind: none}
    samples: 4                                # trials (grid: repeats of the grid)
    concurrent: 2                             # trials at once
    resources: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 0}
    objective: {metric: val_qmse_top5, mode: min, bias_metric: val_mean_bias, bias_bound: 0.2}
    holdout: 256                              # test windows the front is scored on (0: none)

The objective ranks trials on what the platform is for, the heavy tail in physical units
(never a training loss, which lives in a different space for each bin count or input
transformation), among the trials whose absolute mean bias stays under the bound.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from cloudburst.schema import Strict
from cloudburst.tuning.space import Domain, Grid

__all__ = [
    "Asha",
    "NoScheduler",
    "Objective",
    "Resources",
    "Search",
    "SweepConfig",
    "SweepRun",
]


class Search(Strict):
    """How points are chosen: ``random`` (and every grid value), ``grid`` (only grid domains:
    every combination, ``samples`` times), ``optuna`` (TPE; no grid domains)."""

    algorithm: Literal["random", "grid", "optuna"] = Field(
        "random",
        description="`random`, `grid` (grid domains only) or `optuna` (TPE; no grid domains)",
    )
    seed: int = Field(
        0, description="seed of the Optuna sampler and of the points checked before trials start"
    )


class Asha(Strict):
    """Asynchronous successive halving over epochs: trials behind at a rung stop early."""

    kind: Literal["asha"] = Field(description="`asha`: asynchronous successive halving")
    grace_period: int = Field(1, ge=1, description="epochs before a trial can be stopped")
    reduction_factor: float = Field(
        2.0,
        gt=1,
        description="rungs are this factor apart in epochs; the best 1/factor of the trials "
        "at a rung go on",
    )


class NoScheduler(Strict):
    kind: Literal["none"] = Field(description="`none`: every trial trains all its epochs")


class Resources(Strict):
    """Per trial: its training workers and what each reserves (these replace the base
    config's ``train.workers``, ``train.cpus_per_worker`` and ``train.gpus_per_worker``)."""

    workers: int = Field(1, ge=1, description="training workers of one trial")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each worker of a trial reserves")
    gpus_per_worker: float = Field(
        0.0, ge=0, le=8, description="0: CPU only; a fraction shares a GPU between trials"
    )


class Objective(Strict):
    """Minimise (or maximise) ``metric`` among trials with |``bias_metric``| <= ``bias_bound``
    (None: no constraint). Both are per-epoch validation metrics the model family reports."""

    metric: str = Field(
        "val_qmse_top5", description="per-epoch validation metric that ranks the trials"
    )
    mode: Literal["min", "max"] = Field(
        "min", description="`min`: the lowest `metric` wins; `max`: the highest"
    )
    bias_metric: str | None = Field(
        "val_mean_bias",
        description="metric whose absolute value must stay within `bias_bound` (None: no "
        "constraint)",
    )
    bias_bound: float | None = Field(
        0.2,
        gt=0,
        description="largest absolute `bias_metric` of an eligible trial (None: no "
        "constraint); when no trial meets it, the best of all is taken",
    )


class SweepRun(Strict):
    """Where the sweep's trials, checkpoints and runs go (None: the base config's)."""

    storage_path: str | None = Field(
        None, description="Tune's and the trials' storage (object storage on several nodes)"
    )
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI of the sweep's runs (None: the base config's)"
    )
    experiment: str = Field(
        "cloudburst-sweeps", description="MLflow experiment of the sweep's parent and trial runs"
    )
    registered_model: str | None = Field(
        None, description="where the best trial's model is registered (None: the base's)"
    )


class SweepConfig(Strict):
    """A hyperparameter sweep over a training config; see the module docstring."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$",
        description="the sweep's name: its Tune run, its parent MLflow run and its folder "
        "under the storage path",
    )
    base: str = Field(description="the training config the trials start from")
    overrides: list[str] = Field(
        default_factory=list,
        description="`key=value` changes applied to the base config before every trial",
    )
    space: dict[str, Domain] = Field(
        min_length=1,
        description="one domain per dotted key of the training config (e.g. `train.lr`), at "
        "least one",
    )
    search: Search = Field(default_factory=Search, description="how points of the space are chosen")
    scheduler: Annotated[Asha | NoScheduler, Field(discriminator="kind")] = Field(
        default_factory=lambda: NoScheduler(kind="none"),
        description="`{kind: asha, ...}` stops lagging trials early; `{kind: none}` trains "
        "every trial to the end",
    )
    samples: int = Field(
        1,
        ge=1,
        le=10_000,
        description="trials drawn from the space; with grid domains, repeats of the whole grid",
    )
    concurrent: int = Field(
        1,
        ge=1,
        le=1_000,
        description="trials running at once, at most (fewer when the cluster cannot fit them)",
    )
    resources: Resources = Field(
        default_factory=Resources, description="workers and CPUs/GPUs of each trial"
    )
    objective: Objective = Field(
        default_factory=Objective, description="what ranks the trials and the bias bound"
    )
    run: SweepRun = Field(
        default_factory=SweepRun, description="where trials, checkpoints and runs go"
    )
    holdout: int = Field(
        256,
        ge=0,
        le=100_000,
        description="test-split windows the Pareto front is scored on at the end (0: none)",
    )

    @model_validator(mode="after")
    def _search_fits_space(self) -> SweepConfig:
        grids = [k for k, d in self.space.items() if isinstance(d, Grid)]
        if self.search.algorithm == "grid" and len(grids) != len(self.space):
            others = sorted(set(self.space) - set(grids))
            raise ValueError(
                f"search.algorithm grid needs grid domains only; {', '.join(others)} are not "
                "(make them {type: grid, values: [...]} or use algorithm random)"
            )
        if self.search.algorithm == "optuna" and grids:
            raise ValueError(
                f"optuna cannot search grid domains ({', '.join(grids)}); make them "
                "{type: choice, values: [...]}"
            )
        return self

    def trials(self) -> int:
        """How many trials the sweep runs."""
        grid = 1
        for domain in self.space.values():
            if isinstance(domain, Grid):
                grid *= len(domain.values)
        return grid * self.samples
