"""The base of every config model: unknown fields are errors, assignments are validated."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["ConfigError", "Strict"]


class ConfigError(ValueError):
    """A config that cannot be used; the message lists every problem."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
