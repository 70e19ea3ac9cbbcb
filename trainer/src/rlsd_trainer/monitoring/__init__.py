"""Metrics (JSONL, Prometheus), experiment trackers and the training plot."""
