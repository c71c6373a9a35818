"""The base of every config model: unknown fields are errors, assignments are validated, and a
float must be a finite number (``nan``, ``inf`` and ``.inf`` are refused where one is meant)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["ConfigError", "Strict"]


class ConfigError(ValueError):
    """A config that cannot be used; the message lists every problem."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
