"""One variable made from another by a translating model (e.g. visible imagery from infrared).

:func:`translate_store` reads the model's input variable from an ingested store, frame block
by frame block over the whole grid (the network is convolutional), and writes one Zarr v3
store that xarray opens as it opens an ingested one:

- the target variable (its name, e.g. ``hrv``) float32 (time, y, x) in the target's physical
  units (the statistics it was trained with), NaN where the input had no value, chunked one
  block of the model's window length per chunk;
- the source's ``time``, ``y`` and ``x`` coordinates, with their attributes;
- attributes: the model (URI, family, input and target variables), the source store and its
  fingerprint, and the request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from cloudburst.markers import read_marker
from cloudburst.models.package import PrecipitationModel
from cloudburst.products.derived import source_field, write_derived

__all__ = ["KIND", "translate_store"]

log = logging.getLogger(__name__)

KIND = "translation"


def translate_store(
    model: PrecipitationModel,
    source: str,
    output: str,
    *,
    model_uri: str = "",
    variable: str | None = None,
    source_options: dict[str, Any] | None = None,
    output_options: dict[str, Any] | None = None,
    block: int | None = None,
    progress: bool = True,
    on_block: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Translate ``variable`` (default: the variable the model was trained on) of the store
    ``source`` into the model's target variable, written to ``output``; returns the marker.
    A complete store of the same request is kept as it is; ``block``: time steps per pass
    (default the model's window length). ``on_block(done, total)`` is called after each
    block with the time steps written so far; what it raises stops the run (nothing is
    left written)."""
    if model.target is None:
        raise ValueError(
            f"{model_uri or model.name} was not trained on a pair of variables (data.input and "
            "data.target): it does not translate"
        )
    ds, name, field = source_field(source, variable or model.input_variable, source_options)
    nt, ny, nx = (int(n) for n in field.shape)
    step = int(block or model.window[0])
    if step < 1:
        raise ValueError(f"block must be >= 1 time step, got {block}")
    target = model.target.variable
    units = str((model.target.stats or {}).get("units", ""))
    identity = {
        "product": KIND,
        "model": model_uri or model.name,
        "model_config": model.config,
        "window": list(model.window),
        "input_transform": model.transform.state(),
        "target_transform": model.target.transform.state(),
        "source": source,
        "source_fingerprint": (read_marker(source, source_options) or {}).get("fingerprint"),
        "variable": name,
        "target": target,
    }

    def fill(group: Any) -> dict[str, Any]:
        coords = xr.Dataset(coords={c: ds[c] for c in ("time", "y", "x")})
        coords.to_zarr(group.store, mode="a", zarr_format=3, consolidated=False)
        out = group.create_array(
            target,
            shape=(nt, ny, nx),
            chunks=(min(step, nt), ny, nx),
            dtype="float32",
            fill_value=np.float32("nan"),
            dimension_names=["time", "y", "x"],
            attributes={
                "units": units,
                "long_name": f"{target} translated from {name} by {model_uri or model.name}",
            },
        )
        finite = 0
        bar = tqdm(total=nt, desc=f"translate {output}", unit="step", disable=not progress)
        for a in range(0, nt, step):
            b = min(nt, a + step)
            values = field.isel(time=slice(a, b)).values.astype(np.float32)
            made = model.translate(values[None])[0]
            made = np.where(np.isfinite(values), made, np.float32(np.nan))
            out[a:b] = made
            finite += int(np.isfinite(made).sum())
            bar.update(b - a)
            if on_block is not None:
                on_block(b, nt)
        bar.close()
        group.attrs.update(
            {
                "model": model_uri or model.name,
                "family": model.name,
                "input_variable": name,
                "target_variable": target,
                "source": source,
            }
        )
        return {"variable": target, "shape": [nt, ny, nx], "finite_values": finite}

    return write_derived(output, output_options, identity, fill, kind=KIND)
