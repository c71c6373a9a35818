"""Hyperparameter sweeps on Ray Tune: search spaces over the training config, trials that
run the training job's own code, selection on the heavy tail, MLflow parent and child runs."""
