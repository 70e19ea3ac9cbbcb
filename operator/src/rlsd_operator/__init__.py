"""The RLSD Kubernetes operator: reconciles ``RLSDRun`` resources (group ``rlsd.io``)."""

__version__ = "0.1.0"
