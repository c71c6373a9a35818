"""What an ensemble request asks for: model, members, scenario, seed, output and chunking.

One pydantic model shared by the batch job, the engine and the HTTP endpoint, so the three
validate alike and every refusal names the field, the value and what is allowed.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cloudburst.config import StorageConfig

MAX_MEMBERS = 10_000_000
MAX_DIRECTION = 262_144  # numbers of a given shift direction, at most (a 16x128x128 noise)
MAX_URL_CHARS = 1024
MAX_NAME_BYTES = 255


def check_place(field: str, url: str) -> str:
    """Refuse a store URL that no filesystem or object store takes: a NUL byte, more than
    ``MAX_URL_CHARS`` characters, a path component of more than ``MAX_NAME_BYTES`` bytes."""
    if "\x00" in url:
        raise ValueError(f"{field} contains a NUL byte; remove it")
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"{field} is {len(url)} characters long; at most {MAX_URL_CHARS}")
    longest = max((len(part.encode()) for part in url.split("/")), default=0)
    if longest > MAX_NAME_BYTES:
        raise ValueError(
            f"{field} has a path component of {longest} bytes; at most {MAX_NAME_BYTES} per "
            "folder or file name"
        )
    return url


class Condition(BaseModel):
    """A window of an ingested store (``cloudburst ingest`` output) that a conditional
    scenario keeps as known: its first time step and its top-left grid cell."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(
        min_length=1,
        max_length=MAX_URL_CHARS,
        description="ingested Zarr store URL: path, s3://, gs://",
    )
    time: str = Field(
        min_length=1, max_length=64, description="ISO time of the window's first step"
    )
    y: int = Field(0, ge=0, le=1_000_000, description="first grid row of the window")
    x: int = Field(0, ge=0, le=1_000_000, description="first grid column of the window")

    @field_validator("data")
    @classmethod
    def _place(cls, value: str) -> str:
        return check_place("data", value)


CONDITIONAL_KINDS = ("interpolation", "forecast", "extension")


class Scenario(BaseModel):
    """How members are drawn.

    ``unconditional``: plain draws, every weight 1. ``extreme``: draws steered towards the tail,
    each member with its importance weight p / q, so weighted estimates stay unbiased. What a
    proposal steers is the model's standard-normal input z: a VAE's latent code, or the initial
    noise z_1 of a diffusion sampler (every other random input, such as the ancestral
    sampler's step noise, keeps its prior, so the weight is p(z) / q(z) for either sampler):

    - ``proposal: shift`` (the default of ``extreme``): a defensive mixture of the prior (share
      ``defensive``) and N(``shift`` d, I), d the unit direction along which the model's
      extremes grow (or ``direction`` if given: the latent size, or time x y x x numbers of a
      diffusion model's window);
    - ``proposal: tail``: a defensive mixture of the prior and the prior restricted to radii
      ||z|| beyond the ``tail_quantile`` of the chi distribution. Efficient only where heavy
      rain comes with large inputs whatever their direction; elsewhere the rare events it
      misses are carried by the few defensive draws and its variance is high;
    - ``proposal: fitted``: a defensive mixture of the prior and a proposal fitted to the
      model's own tail from ``pilot_draws`` pilot draws (their cost recorded). For a latent
      model, a Gaussian N(m, C) by the cross-entropy method: level by level, the best tenth
      of the pilot draws (by window maximum) set the next level and the next Gaussian, until
      the level reached has a prior probability of at most 1 - ``tail_quantile``; it finds
      where the tail lies, whether far out or near the centre of the latent space. For a
      diffusion model (unconditional extremes), a union of local events: a small noise
      pattern, learnt from the best 1% of prior pilot draws aligned on the pixel of their
      maximum, placed at one place per draw with the probabilities those maxima showed;
    - ``proposal: prior``: no steering (the default of every other kind).

    Diffusion models, conditioned on observed frames (``condition``, a window of an ingested
    store) by reconstruction guidance of weight ``guidance`` (default: the model's; 0 is
    imputation):

    - ``interpolation``: every ``every``-th step of the window known, the others generated;
    - ``forecast``: the first ``context`` steps known (default half the window);
    - ``extension``: members of ``length`` steps, each new window conditioned on the last
      ``context`` steps so far; the first window starts from the condition's first
      ``context`` steps, or is an unconditional draw when no condition is given.

    These take the ``shift`` and ``tail`` proposals too (conditional extremes: "a 1-in-100
    version of the next hours given the last ones"); an extension steers the noise of its
    first window. Known values come back in the members exactly as observed.

    ``threshold`` (physical units) or ``threshold_quantile`` (of the training data) keeps only
    members whose window has a pixel at or above it (rejection; acceptance rate recorded).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: Literal["unconditional", "extreme", "interpolation", "forecast", "extension"] = Field(
        "unconditional",
        description="plain draws, draws steered to the tail (`extreme`, weighted) or a "
        "conditional kind (see the class doc)",
    )
    proposal: Literal["prior", "shift", "tail", "fitted"] | None = Field(
        None, description="shift for extreme, prior otherwise (see the class doc)"
    )
    tail_quantile: float = Field(
        0.99, gt=0.0, lt=1.0, description="tail: the radius quantile; fitted: the aimed level"
    )
    pilot_draws: int = Field(
        1000, ge=100, le=100_000, description="fitted: pilot draws (per level for latent models)"
    )
    shift: float = Field(
        3.0,
        gt=0.0,
        le=20.0,
        description="shift: how far the proposal's mean lies along the direction, in "
        "standard deviations of z",
    )
    direction: list[float] | None = Field(
        None,
        min_length=1,
        max_length=MAX_DIRECTION,
        description="the shift direction: exactly the size of the model's steered input",
    )
    defensive: float = Field(
        0.1,
        gt=0.0,
        le=1.0,
        description="share of a steered proposal's draws taken from the prior (1: the prior only)",
    )
    threshold: float | None = Field(
        None,
        ge=0.0,
        description="keep only members with a pixel at or above this, in the model's units "
        "(e.g. mm/day); None: no rejection",
    )
    threshold_quantile: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="the threshold as a quantile of the training data (one the model's "
        "statistics hold); not with `threshold`",
    )
    max_candidates_per_member: int = Field(
        10_000,
        ge=1,
        description="rejection: draws tried per member, at most; then the request fails",
    )
    condition: Condition | None = Field(
        None,
        description="the observed window conditional kinds keep as known (needed by "
        "interpolation and forecast)",
    )
    context: int | None = Field(
        None,
        ge=1,
        description="forecast, extension: known leading time steps (default half the window)",
    )
    every: int = Field(
        2, ge=2, description="interpolation: every `every`-th time step of the window is known"
    )
    length: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="extension: time steps of each member (required there)",
    )
    guidance: float | None = Field(
        None,
        ge=0.0,
        description="conditional kinds: reconstruction guidance weight (None: the version's "
        "tuned or the model's; 0: imputation)",
    )

    @field_validator("direction")
    @classmethod
    def _nonzero(cls, value: list[float] | None) -> list[float] | None:
        if value is None:
            return value
        norm = math.sqrt(math.fsum(v * v for v in value))
        if not (norm > 0.0 and math.isfinite(norm)):
            raise ValueError(
                "the direction normalises to zero (or overflows): give numbers of ordinary "
                "size with at least one not 0, or leave direction out to use the decoder's"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        if self.threshold is not None and self.threshold_quantile is not None:
            raise ValueError("give threshold or threshold_quantile, not both")
        conditional = self.kind in CONDITIONAL_KINDS
        if self.proposal is None:
            self.proposal = "shift" if self.kind == "extreme" else "prior"
        if self.kind == "extreme" and self.proposal == "prior":
            raise ValueError(
                "an extreme scenario steers its draws: proposal shift or tail (or kind "
                "unconditional for plain draws)"
            )
        if self.kind == "unconditional" and self.proposal != "prior":
            raise ValueError(
                f"proposal {self.proposal} steers draws: use kind extreme (or a conditional "
                "kind) with it"
            )
        if self.direction is not None and self.proposal != "shift":
            raise ValueError("scenario.direction applies to the shift proposal")
        if self.kind in ("interpolation", "forecast") and self.condition is None:
            raise ValueError(
                f"{'an' if self.kind[0] in 'aeiou' else 'a'} {self.kind} needs "
                "scenario.condition: the observed window "
                "{data: STORE, time: ISO_TIME, y: ROW, x: COLUMN}"
            )
        if self.kind == "extension" and self.length is None:
            raise ValueError("an extension needs scenario.length: the time steps of each member")
        for name in ("condition", "guidance"):
            if getattr(self, name) is not None and not conditional:
                raise ValueError(
                    f"scenario.{name} applies to interpolation, forecast and extension, "
                    f"not {self.kind}"
                )
        if self.context is not None and self.kind not in ("forecast", "extension"):
            raise ValueError(f"scenario.context applies to forecast and extension, not {self.kind}")
        if self.length is not None and self.kind != "extension":
            raise ValueError(f"scenario.length applies to extension, not {self.kind}")
        return self

    @property
    def conditional(self) -> bool:
        return self.kind in CONDITIONAL_KINDS

    @property
    def steered(self) -> bool:
        """Whether draws come from a proposal other than the prior (weights not all 1)."""
        return self.proposal in ("shift", "tail", "fitted")

    @property
    def rejects(self) -> bool:
        return self.threshold is not None or self.threshold_quantile is not None


class EnsembleRequest(BaseModel):
    """An ensemble: ``members`` windows of ``model`` into the Zarr store ``output``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(
        min_length=1, max_length=1024, description="models:/NAME@ALIAS, models:/NAME/VERSION"
    )
    members: int = Field(ge=1, le=MAX_MEMBERS, description="members (windows) to generate")
    seed: int = Field(
        0,
        ge=0,
        lt=2**63,
        description="draw k's noise comes from (seed, k) alone: same seed, same members",
    )
    output: str = Field(
        min_length=1,
        max_length=MAX_URL_CHARS,
        description="Zarr store URL: local path, s3://, gs://",
    )
    scenario: Scenario = Field(default_factory=Scenario, description="how members are drawn")
    batch_size: int = Field(64, ge=1, le=4096, description="members decoded per model call")
    chunk_members: int = Field(256, ge=1, le=100_000, description="members per Zarr chunk")
    steps: int | None = Field(
        None, ge=1, le=10_000, description="diffusion models: sampler steps (default the model's)"
    )
    sampler: Literal["ancestral", "ddim"] | None = Field(
        None, description="diffusion models: sampler (default the model's)"
    )
    storage: StorageConfig = Field(
        default_factory=StorageConfig,
        description="how batch runs reach object storage; the endpoint refuses it and uses "
        "its own settings",
    )
    deadline_s: float | None = Field(
        None,
        gt=0,
        description="the endpoint: seconds the job may take from submission (at most the "
        "server's job_deadline_s); batch runs ignore it",
    )

    @field_validator("output")
    @classmethod
    def _place(cls, value: str) -> str:
        return check_place("output", value)

    def identity(self) -> dict[str, object]:
        """What fixes the bytes of the store (not where it goes, how it is reached or how
        long it may take)."""
        return self.model_dump(mode="json", exclude={"output", "storage", "deadline_s"})
