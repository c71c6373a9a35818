"""Evaluation of trained models: figures (``figures``) and the post-training report (``report``)."""
