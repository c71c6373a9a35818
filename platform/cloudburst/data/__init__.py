"""Data layer: sources, references, ingest, synthetic data, windows, transforms, loader."""
