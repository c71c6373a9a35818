"""Cloudburst: generative models of precipitation and ensembles of extreme weather.

``cloudburst.open_ensemble(url, storage_options=None)`` opens a complete ensemble store as an
:class:`xarray.Dataset` (see :mod:`cloudburst.ensembles.open`); it is imported on first use,
so ``import cloudburst`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "open_ensemble"]

if TYPE_CHECKING:
    from cloudburst.ensembles.open import open_ensemble


def __getattr__(name: str) -> Any:
    """The lazily imported public names (``open_ensemble``)."""
    if name == "open_ensemble":
        from cloudburst.ensembles.open import open_ensemble

        return open_ensemble
    raise AttributeError(f"module 'cloudburst' has no attribute {name!r}")
