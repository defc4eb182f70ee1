"""Metrics: estimates with their definition, n and a 95% confidence interval (Wilson or bootstrap)."""

from .stats import Estimate, bootstrap_ci, estimate_mean

__all__ = ["Estimate", "bootstrap_ci", "estimate_mean"]
