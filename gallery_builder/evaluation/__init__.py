"""Evaluation: retrieval metrics, rejection views, the experiment (splits, presets), report."""
