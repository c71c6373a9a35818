"""Generative models: networks, their losses, and the registry that builds them by name."""
