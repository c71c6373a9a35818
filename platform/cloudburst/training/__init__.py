"""Training: framework-free steps, Ray Train wiring, checkpoints."""
