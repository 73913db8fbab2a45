"""Shared by every task kind: config, run directory, training loop, episodes, splits, metrics, reports."""
