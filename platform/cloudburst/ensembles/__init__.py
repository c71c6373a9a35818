"""Ensembles: one generation engine (``generate``), its Zarr store (``store``) and the
weighted extreme-value estimates over it (``extremes``)."""
