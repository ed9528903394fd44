"""planewatch: per-plane network metrics for multi-homed Kubernetes pods."""
__version__ = "0.1.0"
