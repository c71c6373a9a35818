"""The real samples in ../shared/data: where they are, and a skip with the reason when absent."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def needs_data(name: str) -> Path:
    """Path of sample ``name``; skips the calling test when it is absent."""
    path = DATA / name
    if not path.exists():
        pytest.skip(f"real sample {name} not found in {DATA} (../shared/data is optional)")
    return path
