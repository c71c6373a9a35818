"""An ensemble on disk: one Zarr v3 store of (member, time, y, x), written chunk by chunk.

Layout (xarray opens it with ``xr.open_zarr(url, consolidated=False)``):

- ``precip`` float32 (member, time, y, x) in physical units, CF attributes, chunked
  ``(chunk_members, time, y, x)``;
- ``weight`` float64 (member,): importance weight p(z) / q(z) (1 for plain Monte Carlo);
- ``candidate`` int64 (member,): the draw index whose noise made the member (= member index
  unless a threshold rejects draws);
- ``direction`` float64 (direction_component,), shift proposals only: the unit direction the
  proposal shifted the model's standard-normal input along (a latent code, or a diffusion
  sampler's initial noise flattened from (1, time, y, x)); ``fitted_mean`` and
  ``fitted_covariance``, fitted proposals only: the Gaussian the proposal mixes in;
- coordinates ``member``, ``time`` (hours since the window's first step), ``y``, ``x``
  (window indices); a conditioned ensemble carries its condition's real times (CF ``hours
  since``) and the source store's y / x instead;
- group attributes: provenance (model URI and resolved version, run id, the request, the seed
  rule, package version, creation time).

Progress: after a member chunk's data is written (its three objects concurrently),
``_cloudburst/progress/chunk-NNNNNNNN.json`` records it; a resumed request writes only the
chunks without one. ``_cloudburst/complete.json`` is written last: a store without it never
reads as complete. (``_cloudburst`` is a Zarr
subgroup, so readers listing the store see nothing foreign.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from cloudburst import __version__, storage
from cloudburst.markers import MARKER, fingerprint, read_marker, write_marker

# kept importable from here, where ensembles.generate and evaluation import it from
from cloudburst.storage import zarr_store

PROGRESS = f"{storage.SIDECAR}/progress"
FORMAT = "cloudburst-ensemble/1"
CREATING = "cloudburst_creating"  # the fingerprint of a creation under way, "" once done
SEED_RULE = (
    "member k (draw k when a threshold rejects draws) uses "
    "numpy.random.default_rng(numpy.random.SeedSequence([seed, k])); decoded in fixed-size "
    "batches of batch_size, so a member's values do not depend on the other members"
)
CF_UNITS = {"mm/day": "mm day-1", "mm/h": "mm h-1", "mm/hr": "mm h-1", "mm": "mm"}


class EnsembleStoreError(RuntimeError):
    """The output cannot take this ensemble (another ensemble, not a store, incomplete...)."""


@dataclass(frozen=True)
class Layout:
    members: int
    window: tuple[int, int, int]
    chunk_members: int

    @property
    def chunks(self) -> int:
        return -(-self.members // self.chunk_members)

    def span(self, chunk: int) -> tuple[int, int]:
        a = chunk * self.chunk_members
        return a, min(self.members, a + self.chunk_members)


class EnsembleStore:
    """Create or reopen the store at ``url`` for one ensemble identity; write chunks into it."""

    def __init__(self, url: str, options: dict[str, Any] | None, layout: Layout) -> None:
        self.url = url
        self.options = dict(options or {})
        self.layout = layout
        self.group = zarr.open_group(zarr_store(url, self.options), mode="r+", zarr_format=3)

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        url: str,
        options: dict[str, Any] | None,
        *,
        layout: Layout,
        identity: dict[str, Any],
        attrs: dict[str, Any],
        units: str,
        coords: dict[str, tuple[np.ndarray, dict[str, Any]]] | None = None,
        vectors: dict[str, tuple[np.ndarray, list[str], str]] | None = None,
    ) -> EnsembleStore:
        """The store for ``identity``: created if absent, reopened to resume if it holds the
        same ensemble; refused if it holds anything else."""
        storage.check_reachable(url, options)
        key = fingerprint(identity)
        found = cls._existing_fingerprint(url, options)
        if found is None:
            cls._create(url, options, layout, key, identity, attrs, units, coords, vectors)
        elif found != key:
            raise EnsembleStoreError(
                f"{url} already holds a different ensemble (fingerprint {found}, this request "
                f"{key}); choose another output URL or remove the old store"
            )
        return cls(url, options, layout)

    @staticmethod
    def _existing_fingerprint(url: str, options: dict[str, Any] | None) -> str | None:
        if not storage.exists(url, options):
            return None
        fs, path = storage.filesystem(url, options)
        if fs.isfile(path):
            raise EnsembleStoreError(f"{url} is a file, not a store; choose another output URL")
        if not storage.exists(storage.join(url, "zarr.json"), options):
            if fs.ls(path):
                raise EnsembleStoreError(
                    f"{url} exists and is not a Cloudburst ensemble; refusing to write into it. "
                    "Choose another output URL or remove it."
                )
            return None
        group = zarr.open_group(zarr_store(url, options, read_only=True), mode="r")
        attrs = group.attrs
        key = attrs.get("cloudburst_fingerprint")
        if not key and attrs.get("cloudburst_format") == FORMAT and attrs.get(CREATING):
            return None  # a creation that never finished: made again from scratch
        if not key and not dict(attrs) and not list(group.keys()):
            return None  # an empty group: a creation cut short before its first attribute
        if attrs.get("cloudburst_format") != FORMAT or not key:
            raise EnsembleStoreError(
                f"{url} is a Zarr store but not a Cloudburst ensemble; refusing to write into "
                "it. Choose another output URL or remove it."
            )
        return str(key)

    @staticmethod
    def _create(
        url: str,
        options: dict[str, Any] | None,
        layout: Layout,
        key: str,
        identity: dict[str, Any],
        attrs: dict[str, Any],
        units: str,
        coords: dict[str, tuple[np.ndarray, dict[str, Any]]] | None = None,
        vectors: dict[str, tuple[np.ndarray, list[str], str]] | None = None,
    ) -> None:
        t, y, x = layout.window
        n, c = layout.members, layout.chunk_members
        group = zarr.open_group(zarr_store(url, options), mode="w", zarr_format=3)
        # first, the mark of a creation under way: a run killed before the fingerprint (the
        # last attribute) leaves a store that the next run recognises and makes again
        group.attrs.update({"cloudburst_format": FORMAT, CREATING: key})

        def coord(name: str, values: np.ndarray, extra: dict[str, Any]) -> None:
            arr = group.create_array(
                name,
                shape=values.shape,
                dtype=values.dtype,
                chunks=(min(len(values), 1_000_000),),
                dimension_names=[name],
                attributes=extra,
            )
            arr[:] = values

        given = dict(coords or {})
        defaults = {
            "time": (
                np.arange(t, dtype=np.float64) * float(attrs.get("time_step_hours", 1.0)),
                {"long_name": "time since the window's first step", "units": "hours"},
            ),
            "y": (np.arange(y, dtype=np.int64), {"long_name": "grid row of the window"}),
            "x": (np.arange(x, dtype=np.int64), {"long_name": "grid column of the window"}),
        }
        coord("member", np.arange(n, dtype=np.int64), {"long_name": "ensemble member"})
        for name, size in (("time", t), ("y", y), ("x", x)):
            values, extra = given.get(name, defaults[name])
            if len(values) != size:
                raise ValueError(f"coordinate {name} has {len(values)} values for {size} steps")
            coord(name, np.asarray(values), dict(extra))
        group.create_array(
            "precip",
            shape=(n, t, y, x),
            dtype="float32",
            chunks=(c, t, y, x),
            fill_value=np.float32("nan"),
            dimension_names=["member", "time", "y", "x"],
            attributes={
                "long_name": "precipitation",
                "standard_name": "lwe_precipitation_rate" if "/" in units else "precipitation",
                "units": CF_UNITS.get(units, units),
            },
        )
        group.create_array(
            "weight",
            shape=(n,),
            dtype="float64",
            chunks=(c,),
            fill_value=np.float64("nan"),
            dimension_names=["member"],
            attributes={"long_name": "importance weight p(z) / q(z) of the member's draw"},
        )
        group.create_array(
            "candidate",
            shape=(n,),
            dtype="int64",
            chunks=(c,),
            fill_value=-1,
            dimension_names=["member"],
            attributes={"long_name": "index of the draw that made the member"},
        )
        for name, (values, dims, what) in (vectors or {}).items():
            v = np.asarray(values, dtype=np.float64)
            arr = group.create_array(
                name,
                shape=v.shape,
                dtype="float64",
                chunks=v.shape,
                dimension_names=dims,
                attributes={"long_name": what},
            )
            arr[...] = v
        # the fingerprint last: a store is only ever resumed once its layout is whole
        group.attrs.update(
            {
                **attrs,
                "Conventions": "CF-1.10",
                "cloudburst_format": FORMAT,
                "cloudburst_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "seed_rule": SEED_RULE,
                "request": json.dumps(identity, sort_keys=True),
                "chunk_members": c,
                "cloudburst_fingerprint": key,
                CREATING: "",
            }
        )

    # ------------------------------------------------------------------ progress

    def done(self) -> dict[int, dict[str, Any]]:
        """Chunk index -> its progress record, for every chunk written whole."""
        fs, path = storage.filesystem(storage.join(self.url, PROGRESS), self.options)
        if not fs.exists(path):
            return {}
        out = {}
        for name in fs.ls(path, detail=False):
            base = name.rstrip("/").rsplit("/", 1)[-1]
            if base.startswith("chunk-") and base.endswith(".json"):
                with fs.open(name, "rb") as f:
                    record = json.loads(f.read())
                out[int(record["chunk"])] = record
        return out

    def write_chunk(
        self,
        chunk: int,
        precip: np.ndarray,
        weight: np.ndarray,
        candidate: np.ndarray,
        record: dict[str, Any],
    ) -> None:
        """Write member chunk ``chunk`` whole, then its progress record."""
        a, b = self.layout.span(chunk)
        if precip.shape != (b - a, *self.layout.window):
            raise ValueError(
                f"chunk {chunk} needs {(b - a, *self.layout.window)}, got {precip.shape}"
            )
        parts = {
            "precip": precip.astype(np.float32, copy=False),
            "weight": weight.astype(np.float64, copy=False),
            "candidate": candidate.astype(np.int64, copy=False),
        }

        def put(name: str) -> None:
            self.group[name][a:b] = parts[name]

        # the chunk's objects are written concurrently (object storage answers in tens of ms),
        # its progress record only once they are all in
        with ThreadPoolExecutor(len(parts), thread_name_prefix="cloudburst-chunk-write") as pool:
            for done in [pool.submit(put, name) for name in parts]:
                done.result()
        body = {"chunk": chunk, "members": [a, b], **record}
        storage.write_sidecar(
            self.url, f"progress/chunk-{chunk:08d}.json", json.dumps(body).encode(), self.options
        )

    def complete(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Write the completion marker (after every chunk); returns what it says."""
        done = self.done()
        missing = [i for i in range(self.layout.chunks) if i not in done]
        if missing:
            raise EnsembleStoreError(
                f"{self.url}: chunks {missing[:5]} not written; cannot mark complete"
            )
        body = {
            "fingerprint": self.group.attrs["cloudburst_fingerprint"],
            "members": self.layout.members,
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **summary,
        }
        write_marker(self.url, body, self.options)
        return body


def member_chunks(url: str, options: dict[str, Any] | None = None) -> Iterable[dict[str, Any]]:
    """Stream a complete ensemble chunk by chunk: dicts of ``precip``, ``weight``, ``member``.

    Refuses an incomplete store. Memory is one chunk.
    """
    marker = read_marker(url, options)
    if marker is None:
        raise EnsembleStoreError(
            f"{url} is not a complete ensemble (no {MARKER}); finish or re-run its request"
        )
    group = zarr.open_group(zarr_store(url, options, read_only=True), mode="r")
    precip, weight = group["precip"], group["weight"]
    n, c = precip.shape[0], precip.chunks[0]
    for a in range(0, n, c):
        b = min(n, a + c)
        yield {
            "precip": np.asarray(precip[a:b]),
            "weight": np.asarray(weight[a:b]),
            "member": np.arange(a, b),
            "marker": marker,
        }
