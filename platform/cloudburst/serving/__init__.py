"""The Ray Serve application over the ensemble engine."""
