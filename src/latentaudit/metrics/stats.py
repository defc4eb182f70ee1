"""Every number latentaudit reports is an :class:`Estimate`: value, 95% CI, n and definition.

Confidence intervals are percentile bootstraps over prompts (resampling prompts with
replacement), computed with ``scipy.stats.bootstrap`` from a fixed seed so that the same data
give the same interval. A proportion that is 0 or 1 on every prompt gets the degenerate interval
[value, value]: the bootstrap cannot see beyond the sample, and ``n`` says how small it was.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict


class Estimate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    value: float | None
    lo: float | None
    hi: float | None
    n: int
    definition: str
    ci: str = "95% percentile bootstrap over prompts"

    def fmt(self, digits: int = 2) -> str:
        if self.value is None:
            return "n/a"
        return f"{self.value:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}] (n={self.n})"


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic`` over the first axis of ``values``."""
    from scipy.stats import bootstrap

    x = np.asarray(values, dtype=float)
    if x.shape[0] == 0:
        return (float("nan"), float("nan"))
    if x.shape[0] == 1 or np.all(x == x[0]):
        v = float(statistic(x))
        return (v, v)
    res = bootstrap(
        (x,),
        lambda s, axis=-1: np.apply_along_axis(statistic, axis, s) if statistic is not np.mean else np.mean(s, axis=axis),
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
        vectorized=True,
    )
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


def paired_diff_ci(a: Sequence[float], b: Sequence[float], seed: int = 0) -> tuple[float, float, float]:
    """Mean of a − b over paired prompts with its bootstrap CI."""
    d = np.asarray(a, float) - np.asarray(b, float)
    lo, hi = bootstrap_ci(d, seed=seed)
    return float(d.mean()), lo, hi


def estimate_mean(values: Sequence[float], definition: str, seed: int = 0) -> Estimate:
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return Estimate(value=None, lo=None, hi=None, n=0, definition=definition)
    lo, hi = bootstrap_ci(x, seed=seed)
    return Estimate(value=float(x.mean()), lo=lo, hi=hi, n=int(x.size), definition=definition)
