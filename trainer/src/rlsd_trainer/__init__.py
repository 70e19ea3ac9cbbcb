"""RLSD training runtime: RLVR with self-distillation, its baselines, and the local CPU mode."""

__version__ = "0.1.0"
