"""Cloudburst: generative models of precipitation and ensembles of extreme weather."""

__version__ = "0.1.0"
