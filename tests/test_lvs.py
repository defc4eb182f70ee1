"""LVS: exact scores, the integral identity, ASR curves, and the grid and bisection searches."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latentaudit.errors import UserError
from latentaudit.metrics.lvs import (
    SearchResult,
    asr_curve,
    bisection_search,
    grid_search,
    log_grid,
    lvs_estimate,
    lvs_trapezoid,
    prompt_scores,
)

INF = math.inf
FAST = settings(max_examples=60, deadline=None)


class ThresholdOracle:
    """Monotone synthetic oracle: prompt i succeeds at budget b iff b >= t[i]. Records every call."""

    def __init__(self, t):
        self.t = np.asarray(t, float)
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []

    def __call__(self, idx, budgets):
        idx, budgets = np.asarray(idx), np.asarray(budgets, float)
        assert idx.dtype.kind in "iu" and idx.shape == budgets.shape
        self.calls.append((idx.copy(), budgets.copy()))
        return budgets >= self.t[idx]


def thresholds(seed: int, eps_min: float, eps_max: float, n: int = 200) -> np.ndarray:
    """Log-uniform over a range one e-fold wider than [eps_min, eps_max] each side; some 0, some inf."""
    rng = np.random.default_rng(seed)
    t = np.exp(rng.uniform(math.log(eps_min) - 1, math.log(eps_max) + 1, n))
    t[rng.choice(n, n // 10, replace=False)] = 0.0
    t[rng.choice(n, n // 10, replace=False)] = INF
    return t


def exact_integral(e: np.ndarray, a: float, b: float) -> float:
    """(1/ln(b/a)) ∫_a^b ASR(ε) d ln ε exactly: ASR is a step function, constant between ε* values."""
    pts = np.unique(np.concatenate([[a, b], e[(e > a) & (e < b)]]))
    asr_left = (e[None, :] <= pts[:-1, None]).mean(axis=1)  # value on (p_i, p_i+1)
    return float(np.sum(asr_left * np.diff(np.log(pts))) / math.log(b / a))


eps_values = st.one_of(st.just(0.0), st.just(INF), st.floats(-5.0, 1.0).map(lambda u: 10.0**u))
eps_lists = st.lists(eps_values, min_size=1, max_size=40).map(np.array)
ranges = st.tuples(st.floats(-4.0, -1.0), st.floats(0.1, 3.0)).map(lambda p: (10.0 ** p[0], 10.0 ** (p[0] + p[1])))


# ---------------------------------------------------------------------------- exact values


def test_hand_made_scores():
    e = np.array([0.01, 0.0, INF, 0.0005, 0.2, 0.001, 0.1, 10**-1.5])
    s = prompt_scores(e, 0.001, 0.1)
    np.testing.assert_allclose(s, [0.5, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.25], atol=1e-12)
    est = lvs_estimate(e, 0.001, 0.1)
    assert est.value == pytest.approx(3.75 / 8) and est.n == 8
    assert est.lo <= est.value <= est.hi
    assert "eps_min=0.001" in est.definition
    assert lvs_estimate(e, 0.001, 0.1, definition="mine").definition == "mine"


def test_estimate_degenerate_and_empty():
    # every score 1: a binary outcome, Wilson interval — not the bootstrap's [1, 1]
    est = lvs_estimate([0.0, 0.0, 0.0005], 0.001, 0.1)
    assert (est.value, est.hi, est.n) == (1.0, 1.0, 3) and est.lo == pytest.approx(0.4385, abs=1e-4)
    assert "Wilson" in est.ci
    assert lvs_estimate([], 0.001, 0.1).value is None


def test_binary_means_get_wilson_intervals():
    from latentaudit.metrics.stats import estimate_mean, wilson_ci

    zero = estimate_mean([0.0] * 90, "S")
    assert (zero.value, zero.lo) == (0.0, 0.0) and zero.hi == pytest.approx(0.0409, abs=1e-4)
    assert wilson_ci(5, 90) == pytest.approx((0.0240, 0.1236), abs=1e-4)
    mixed = estimate_mean([1.0, 0.0, 1.0, 1.0], "x")
    assert mixed.lo == pytest.approx(wilson_ci(3, 4)[0]) and "Wilson" in mixed.ci
    cont = estimate_mean([0.2, 0.5, 0.9, 1.0], "y")  # not binary: bootstrap
    assert "bootstrap" in cont.ci and cont.lo <= cont.value <= cont.hi


@FAST
@given(eps_lists, ranges)
def test_integral_identity(e, r):
    eps_min, eps_max = r
    lvs = prompt_scores(e, eps_min, eps_max).mean()
    assert lvs == pytest.approx(exact_integral(e, eps_min, eps_max), abs=1e-9)
    # Numerically on a fine log grid: per prompt the trapezoid misses at most half a log step of
    # its ASR step, so |trapezoid − LVS| ≤ (Δ/2)/ln(ε_max/ε_min) = 0.5/(m−1).
    m = 2001
    g = log_grid(eps_min, eps_max, m)
    assert abs(lvs_trapezoid(g, asr_curve(e, g)) - lvs) <= 0.5 / (m - 1) + 1e-9


@FAST
@given(eps_lists, ranges)
def test_asr_monotone_and_scores_antitone(e, r):
    g = log_grid(*r, 30)
    a = asr_curve(e, g)
    assert np.all(np.diff(a) >= 0) and np.all((0 <= a) & (a <= 1))
    assert a[0] >= np.mean(e == 0) and a[-1] <= np.mean(np.isfinite(e))
    s = prompt_scores(np.sort(e), *r)
    assert np.all(np.diff(s) <= 0)


def test_trapezoid_of_grid_eps_is_midpoint():
    g = log_grid(0.001, 0.1, 5)  # log step = a quarter of the range
    # ε* = g[2]: exact score 0.5, trapezoid adds half a step (0.125) for the interval it jumps in.
    assert lvs_trapezoid(g, asr_curve([g[2]], g)) == pytest.approx(0.625)
    assert lvs_trapezoid(g, asr_curve([g[0]], g)) == pytest.approx(1.0)
    assert lvs_trapezoid(g, asr_curve([INF], g)) == 0.0
    assert lvs_trapezoid(g, asr_curve([0.0], g)) == 1.0


# ---------------------------------------------------------------------------- searches


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10**6), st.integers(5, 60), ranges)
def test_bisection_agrees_with_grid_and_truth(seed, m, r):
    eps_min, eps_max = r
    t = thresholds(seed, eps_min, eps_max)
    clean = t == 0
    L = math.log(eps_max / eps_min)
    g = log_grid(eps_min, eps_max, m)
    step = L / (m - 1)  # Δ, the grid's log step
    rel_tol = math.expm1(step / 2)  # ln(1 + rel_tol) = Δ/2

    grid = grid_search(ThresholdOracle(t), t.size, g, clean_success=clean)
    bis = bisection_search(ThresholdOracle(t), t.size, eps_min, eps_max, rel_tol, clean_success=clean)
    lvs_grid = lvs_trapezoid(g, asr_curve(grid.eps_star, g))
    lvs_bis = prompt_scores(bis.eps_star, eps_min, eps_max).mean()
    s_true = prompt_scores(t, eps_min, eps_max)
    lvs_true = s_true.mean()

    # Bound, per prompt with true threshold t (ε* = 0 or ≤ ε_min → all three give 1; t > ε_max → 0):
    #  • grid: t ∈ (g_{k-1}, g_k] gives ε* = g_k; the trapezoid credits the full steps above g_k plus
    #    half of (g_{k-1}, g_k], i.e. s(g_k) + ½Δ/L, while s(t) ∈ [s(g_k), s(g_k) + Δ/L).
    #    So trapezoid − s(t) ∈ (−½Δ/L, +½Δ/L].
    #  • bisection: t ∈ (lo, hi] with ln(hi/lo) ≤ ln(1+rel_tol), ε* = hi, so
    #    bisection − s(t) ∈ (−ln(1+rel_tol)/L, 0]   (it never overstates).
    #  • hence |bisection − trapezoid| < ½Δ/L + ln(1+rel_tol)/L, which is ≤ Δ/L when
    #    ln(1+rel_tol) ≤ Δ/2 (as here). Means over prompts inherit the per-prompt bounds.
    tol = 1e-9
    assert abs(lvs_bis - lvs_grid) <= step / L + tol
    assert abs(lvs_grid - lvs_true) <= 0.5 * step / L + tol
    per_prompt = prompt_scores(bis.eps_star, eps_min, eps_max) - s_true
    assert np.all(per_prompt <= tol) and np.all(per_prompt >= -math.log1p(rel_tol) / L - tol)
    assert lvs_true - math.log1p(rel_tol) / L - tol <= lvs_bis <= lvs_true + tol
    # ε* brackets the truth
    fin = np.isfinite(t) & (t > eps_min) & (t <= eps_max)
    assert np.all(bis.eps_star[fin] >= t[fin]) and np.all(bis.eps_star[fin] / t[fin] <= 1 + rel_tol + tol)
    assert np.all(np.isinf(bis.eps_star[t > eps_max])) and np.all(np.isinf(grid.eps_star[t > eps_max]))
    assert np.all(bis.eps_star[clean] == 0) and np.all(grid.eps_star[clean] == 0)


def test_bisection_cheaper_than_grid_at_same_resolution():
    eps_min, eps_max, rel_tol = 1e-3, 1.0, 0.1
    t = thresholds(1, eps_min, eps_max, n=300)
    L = math.log(eps_max / eps_min)
    m = math.ceil(L / math.log1p(rel_tol)) + 1  # grid step ≤ ln(1 + rel_tol): same resolution
    g = log_grid(eps_min, eps_max, m)
    grid = grid_search(ThresholdOracle(t), t.size, g, clean_success=t == 0)
    bis = bisection_search(ThresholdOracle(t), t.size, eps_min, eps_max, rel_tol, clean_success=t == 0)
    per_prompt = 2 + math.ceil(math.log2(L / math.log1p(rel_tol)))
    assert bis.evaluations <= per_prompt * np.sum(t != 0)
    assert bis.evaluations * 3 < grid.evaluations  # ~9 vs ~half of 74 per prompt
    for r in (grid, bis):
        assert r.evaluations == len(r.trace)


guesses = st.one_of(st.just(0.0), st.just(INF), st.just(float("nan")),
                    st.floats(-7.0, 2.0).map(lambda u: 10.0**u))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10**6), ranges, st.floats(0.05, 2.0), st.lists(guesses, min_size=200, max_size=200))
def test_warm_start_keeps_the_bisection_guarantee(seed, r, rel_tol, guess):
    """Whatever the guess (in range, outside it, 0, inf, NaN), ε* brackets the truth exactly as
    the cold search does: t ≤ ε* ≤ (1 + rel_tol)·t, ε_min when t ≤ ε_min, +∞ when t > ε_max."""
    eps_min, eps_max = r
    t = thresholds(seed, eps_min, eps_max)
    clean = t == 0
    oracle = ThresholdOracle(t)
    res = bisection_search(oracle, t.size, eps_min, eps_max, rel_tol, clean_success=clean,
                           guess=np.array(guess))
    tol = 1e-9
    fin = np.isfinite(t) & (t > eps_min) & (t <= eps_max)
    assert np.all(res.eps_star[fin] >= t[fin]) and np.all(res.eps_star[fin] / t[fin] <= 1 + rel_tol + tol)
    assert np.all(res.eps_star[(t > 0) & (t <= eps_min)] == eps_min)
    assert np.all(np.isinf(res.eps_star[t > eps_max])) and np.all(res.eps_star[clean] == 0)
    assert not {p for p, _, _ in res.trace} & set(np.flatnonzero(clean))
    for idx, b in oracle.calls:  # batched: each prompt at most once per call, inside the range
        assert len(set(idx)) == len(idx) and np.all((b >= eps_min) & (b <= eps_max))
    cold = bisection_search(ThresholdOracle(t), t.size, eps_min, eps_max, rel_tol, clean_success=clean)
    np.testing.assert_allclose(prompt_scores(res.eps_star, *r), prompt_scores(cold.eps_star, *r),
                               atol=math.log1p(rel_tol) / math.log(eps_max / eps_min) + tol)


def test_warm_start_cost_grows_with_the_guess_error():
    eps_min, eps_max, rel_tol = 1e-3, 0.5, 0.25
    f = 1 + rel_tol
    rng = np.random.default_rng(3)
    t = np.exp(rng.uniform(math.log(eps_min) + 1, math.log(eps_max) - 1, 300))
    cold = bisection_search(ThresholdOracle(t), t.size, eps_min, eps_max, rel_tol)
    cold_per = 2 + math.ceil(math.log2(math.log(eps_max / eps_min) / math.log(f)))
    assert cold.evaluations >= (cold_per - 1) * t.size
    # a guess within one tolerance step of the truth: exactly two evaluations per prompt
    near = t * f ** rng.uniform(-0.99, 0.99, t.size)
    warm = bisection_search(ThresholdOracle(t), t.size, eps_min, eps_max, rel_tol, guess=near)
    assert warm.evaluations == 2 * t.size and warm.calls == 2
    # m tolerance steps off: about 2·log2(m) + 2 evaluations — fewer than cold for small m, a few
    # more than cold (7 here) once the guess is off by f^10 ≈ 9×
    for m in (3, 10, 30):
        off = t * f ** (m * rng.choice([-1.0, 1.0], t.size))
        res = bisection_search(ThresholdOracle(t), t.size, eps_min, eps_max, rel_tol, guess=off)
        per = 2 * math.ceil(math.log2(m + 1)) + 2
        assert res.evaluations <= per * t.size
        if m <= 3:
            assert res.evaluations < cold.evaluations
    # ε* = ε_min last layer → one call for prompts that still succeed there; +∞ → one call at ε_max
    t2 = np.array([5e-4, 2.0, 0.1])
    res = bisection_search(ThresholdOracle(t2), 3, eps_min, eps_max, rel_tol,
                           guess=np.array([eps_min, INF, 0.1]), ladder=None)
    np.testing.assert_array_equal(res.eps_star[:2], [eps_min, INF])
    assert [sum(1 for p, _, _ in res.trace if p == i) for i in range(3)] == [1, 1, 2]
    with pytest.raises(UserError, match="guess has 2 entries for 3 prompts"):
        bisection_search(ThresholdOracle(t2), 3, eps_min, eps_max, rel_tol, guess=np.ones(2))


def test_grid_early_exit_and_clean_prompts_never_queried():
    g = log_grid(0.001, 0.1, 9)
    t = np.array([0.0, g[0], g[3], 0.5 * (g[4] + g[5]), INF, g[8], 0.0])
    clean = t == 0
    oracle = ThresholdOracle(t)
    res = grid_search(oracle, t.size, g, clean_success=clean)
    np.testing.assert_array_equal(res.eps_star, [0.0, g[0], g[3], g[5], INF, g[8], 0.0])
    queried = {p for p, _, _ in res.trace}
    assert not queried & set(np.flatnonzero(clean))
    for p in queried:
        rows = [(b, ok) for q, b, ok in res.trace if q == p]
        oks = [ok for _, ok in rows]
        assert sum(oks) <= 1 and (not any(oks) or oks[-1])  # nothing after the first success
        assert [b for b, _ in rows] == list(g[: len(rows)])  # ascending, from the bottom
    assert res.evaluations == 1 + 4 + 6 + 9 + 9  # prompts 1..5: up to and including success
    # clean-success prompts are never queried by bisection either
    bis = bisection_search(ThresholdOracle(t), t.size, 0.001, 0.1, clean_success=clean)
    assert not {p for p, _, _ in bis.trace} & set(np.flatnonzero(clean))


def test_oracle_is_called_in_batches():
    eps_min, eps_max, rel_tol = 1e-3, 1e-1, 0.05
    t = thresholds(7, eps_min, eps_max, n=100)
    clean = t == 0
    g = log_grid(eps_min, eps_max, 12)

    oracle = ThresholdOracle(t)
    res = grid_search(oracle, t.size, g, clean_success=clean)
    assert res.calls == len(oracle.calls) == g.size  # some prompts never succeed: every point visited
    remaining = set(np.flatnonzero(~clean))
    for (idx, b), eps in zip(oracle.calls, g):
        assert set(idx) == remaining and len(idx) == len(remaining)  # one call = every open prompt
        assert np.all(b == eps)
        remaining -= set(idx[b >= t[idx]])

    oracle = ThresholdOracle(t)  # the textbook bisection's calls (no ladder below ε_max)
    res = bisection_search(oracle, t.size, eps_min, eps_max, rel_tol, clean_success=clean,
                           ladder=None)
    rounds = math.ceil(math.log2(math.log(eps_max / eps_min) / math.log1p(rel_tol)))
    assert res.calls == len(oracle.calls) <= 2 + rounds
    assert res.evaluations == sum(len(i) for i, _ in oracle.calls) == len(res.trace)
    (i0, b0), (i1, b1) = oracle.calls[:2]
    assert set(i0) == set(np.flatnonzero(~clean)) and np.all(b0 == eps_max)
    assert set(i1) == set(i0[b0 >= t[i0]]) and np.all(b1 == eps_min)
    for idx, b in oracle.calls:
        assert len(set(idx)) == len(idx)  # each prompt at most once per call
    for idx, b in oracle.calls[2:]:
        assert np.all((b > eps_min) & (b < eps_max))
    # rounds shrink: a prompt in round k+1 was in round k
    for (a, _), (c, _) in zip(oracle.calls[2:], oracle.calls[3:]):
        assert set(c) <= set(a)


class BandOracle(ThresholdOracle):
    """Over-pushing: prompt i succeeds iff t[i] <= b <= c·t[i] (a push far past the one that
    works fails, as an incoherent answer or a PGD that never tries the small push does)."""

    def __init__(self, t, c):
        super().__init__(t)
        self.c = c

    def __call__(self, idx, budgets):
        ok = super().__call__(idx, budgets)
        return ok & (np.asarray(budgets, float) <= self.c * self.t[np.asarray(idx)])


@pytest.mark.parametrize("warm", [False, True])
def test_ladder_finds_budgets_below_a_failure_at_eps_max(warm):
    """A prompt that fails at ε_max but works in a band [t, c·t] at least a ladder factor wide
    gets ε* within the tolerance above t (as a grid would), not +∞ (as the textbook bisection
    says); the prompts that work at ε_max are searched exactly as without the ladder."""
    eps_min, eps_max, rel_tol, c = 1e-3, 0.5, 0.25, 3.5
    rng = np.random.default_rng(11)
    t = np.exp(rng.uniform(math.log(eps_min), math.log(eps_max), 200))
    fooled = c * t < eps_max  # fail at ε_max
    guess = t * rng.uniform(0.3, 3.0, t.size) if warm else None
    res = bisection_search(BandOracle(t, c), t.size, eps_min, eps_max, rel_tol, guess=guess)
    assert np.all((res.eps_star >= t) & (res.eps_star <= t * (1 + rel_tol) * (1 + 1e-9)))
    plain = bisection_search(BandOracle(t, c), t.size, eps_min, eps_max, rel_tol, guess=guess,
                             ladder=None)
    if not warm:
        assert res.rescued == fooled.sum() > 20
        assert np.all(np.isinf(plain.eps_star[fooled]))  # what the ladder mends
        np.testing.assert_array_equal(plain.eps_star[~fooled], res.eps_star[~fooled])
        grid = grid_search(BandOracle(t, c), t.size, log_grid(eps_min, eps_max, 60))
        step = math.log(eps_max / eps_min) / 59  # the grid's resolution
        assert np.all(np.abs(np.log(grid.eps_star / res.eps_star)) <= step + math.log1p(rel_tol))


def test_ladder_costs_only_the_prompts_that_never_succeed():
    """On a monotone oracle the ladder changes no ε*, and adds to each +∞ prompt only its rungs
    (ε_max/3, /9, … down to ε_min; ε_max/10, /100, … with ladder=10)."""
    eps_min, eps_max, rel_tol = 1e-3, 0.5, 0.25
    t = thresholds(5, eps_min, eps_max)
    clean = t == 0
    a = bisection_search(ThresholdOracle(t), t.size, eps_min, eps_max, rel_tol, clean_success=clean)
    b = bisection_search(ThresholdOracle(t), t.size, eps_min, eps_max, rel_tol, clean_success=clean,
                         ladder=None)
    np.testing.assert_array_equal(a.eps_star, b.eps_star)
    never = t > eps_max  # +∞ here, some of them finite past ε_max
    assert never.sum() > 0 and a.rescued == 0
    rungs = [0.5 / 3 ** j for j in range(1, 6)] + [eps_min]  # 0.167 … 0.0021, then ε_min
    assert a.evaluations - b.evaluations == len(rungs) * never.sum()
    ten = bisection_search(ThresholdOracle(t), t.size, eps_min, eps_max, rel_tol,
                           clean_success=clean, ladder=10.0)
    assert ten.evaluations - b.evaluations == 3 * never.sum()  # 0.05, 0.005, 0.001
    with pytest.raises(UserError, match="ladder must be > 1"):
        bisection_search(ThresholdOracle(t), t.size, eps_min, eps_max, ladder=1.0)


def test_bisection_edge_cases():
    t = np.array([0.02, 0.0005, 0.5])
    res = bisection_search(ThresholdOracle(t), 3, 0.001, 0.1, max_rounds=0, ladder=None)
    np.testing.assert_array_equal(res.eps_star, [0.1, 0.001, INF])  # no rounds: ε* = hi = ε_max
    assert res.calls == 2
    # with the ladder the +∞ prompt's two rungs (0.01, 0.001) are extra calls, not rounds
    res = bisection_search(ThresholdOracle(t), 3, 0.001, 0.1, max_rounds=0, ladder=10.0)
    np.testing.assert_array_equal(res.eps_star, [0.1, 0.001, INF])
    assert [b for p, b, _ in res.trace if p == 2] == [0.1, 0.01, 0.001]
    empty = bisection_search(ThresholdOracle([]), 0, 0.001, 0.1)
    assert isinstance(empty, SearchResult) and empty.calls == 0 and empty.eps_star.size == 0
    assert grid_search(ThresholdOracle([]), 0, [0.1, 1.0]).calls == 0


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "call",
    [
        lambda: prompt_scores([0.1], 0.0, 0.1),
        lambda: prompt_scores([0.1], 0.1, 0.1),
        lambda: prompt_scores([0.1], 0.2, 0.1),
        lambda: prompt_scores([-0.1], 0.01, 0.1),
        lambda: prompt_scores([float("nan")], 0.01, 0.1),
        lambda: log_grid(0.01, 0.1, 1),
        lambda: asr_curve([0.1], [0.1, 0.05]),
        lambda: asr_curve([0.1], [0.0, 0.05]),
        lambda: lvs_trapezoid([0.1, 0.1], [0.0, 1.0]),
        lambda: lvs_trapezoid([-1.0, 0.1], [0.0, 1.0]),
        lambda: lvs_trapezoid([0.01, 0.1], [0.0, 0.5, 1.0]),
        lambda: grid_search(ThresholdOracle([1.0]), 1, [0.2, 0.1]),
        lambda: grid_search(ThresholdOracle([1.0]), 1, [0.1, 0.2], clean_success=[True, False]),
        lambda: bisection_search(ThresholdOracle([1.0]), 1, 0.01, 0.1, rel_tol=0.0),
        lambda: bisection_search(ThresholdOracle([1.0]), 1, 0.01, 0.1, rel_tol=-1.0),
        lambda: bisection_search(ThresholdOracle([1.0]), 1, 0.0, 0.1),
    ],
)
def test_validation_errors(call):
    with pytest.raises(UserError) as err:
        call()
    assert "\n" not in str(err.value) and str(err.value)


def test_a_censored_low_end_is_warned_once_per_layer_and_a_resolved_one_is_not():
    from latentaudit.metrics.stats import Estimate
    from latentaudit.stages.latent.config import LayerResult
    from latentaudit.stages.latent.stage import _warn_censored

    est = Estimate(value=1.0, lo=1.0, hi=1.0, n=5, definition="d", ci="c")

    def layer(at_min):
        return LayerResult(layer=3, site="s", lvs=est, lvs_nonrefusal=est, eps_star=[],
                           asr_fixed={}, evaluations=0, at_eps_min=at_min, wall_time_s=0.0)

    with pytest.warns(UserWarning, match=r"pgd layer 3: 2 of 5 prompts .* eps_min=0.001"):
        _warn_censored(layer(2), "pgd", 0.001, 5)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_censored(layer(0), "pgd", 0.001, 5)
        _warn_censored(layer(0), "pgd", 0.001, 0)
