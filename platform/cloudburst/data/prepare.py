"""One dataset job: ingest (or generate) a store, then index and split its windows."""

from __future__ import annotations

from typing import Any

from cloudburst import storage
from cloudburst.config import DatasetJobConfig
from cloudburst.data.ingest import describe, ingest_config, open_store
from cloudburst.data.windows import PARTS, build_index, split_index


def target_options(cfg: DatasetJobConfig, url: str) -> dict[str, Any]:
    return storage.options_from(url, cfg.storage)


def prepare_dataset(cfg: DatasetJobConfig, *, progress: bool = True) -> dict[str, Any]:
    """Write ``cfg.ingest.target`` (synthetic when ``cfg.ingest.source`` is None) and summarise it.

    Returns the store's summary (``cloudburst info``) with the window counts of each split part.
    """
    ing = cfg.ingest
    opts = target_options(cfg, ing.target)
    if ing.source is None:
        from cloudburst.data.synthetic import write_synthetic

        result = write_synthetic(
            cfg.synthetic,
            ing.target,
            bins=ing.bins,
            chunks=ing.chunks,
            target_options=opts,
            progress=progress,
        )
    else:
        result = ingest_config(
            ing,
            source_options=target_options(cfg, ing.source),
            target_options=opts,
            progress=progress,
        )
    summary = describe(ing.target, opts)
    summary["ingest_seconds"] = round(result.seconds, 2)
    summary["ingest_skipped"] = result.skipped
    ds, _ = open_store(ing.target, opts)
    index = build_index(ds, cfg.data.windows)
    summary["windows"] = {"all": len(index)}
    for part in PARTS:
        summary["windows"][part] = len(split_index(index, cfg.data.split, part))
    return summary
