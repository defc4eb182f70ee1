"""Every number latentaudit reports is an :class:`Estimate`: value, 95% CI, n and definition.

A mean of binary outcomes (every value 0 or 1: refusal rates, ASR, a per-prompt LVS score that
is 0 or 1 everywhere) gets the 95% Wilson score interval, which stays honest at 0/n and n/n
(0 refusals out of 90 is [0, 0.04]; a percentile bootstrap cannot see beyond the sample and
says [0, 0]). Bernoulli data have the largest variance a [0, 1] value can have at a given
mean, so for bounded scores that happen to be all 0 or 1 the interval errs wide. Any other
mean gets a percentile bootstrap over prompts (resampling prompts with replacement), computed
with ``scipy.stats.bootstrap`` from a fixed seed so that the same data give the same interval.
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


def wilson_ci(k: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval for k successes out of n (scipy's ``binomtest``)."""
    from scipy.stats import binomtest

    if n <= 0:
        return (float("nan"), float("nan"))
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=0.95, method="wilson")
    return (float(ci.low), float(ci.high))


WILSON = "95% Wilson score interval (binary outcomes)"


def estimate_mean(values: Sequence[float], definition: str, seed: int = 0) -> Estimate:
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return Estimate(value=None, lo=None, hi=None, n=0, definition=definition)
    if np.all((x == 0) | (x == 1)):
        lo, hi = wilson_ci(int(x.sum()), int(x.size))
        return Estimate(value=float(x.mean()), lo=lo, hi=hi, n=int(x.size),
                        definition=definition, ci=WILSON)
    lo, hi = bootstrap_ci(x, seed=seed)
    return Estimate(value=float(x.mean()), lo=lo, hi=hi, n=int(x.size), definition=definition)
