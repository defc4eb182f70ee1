"""The whitened budget: Ledoit–Wolf covariance, a ball that maps onto itself under a linear
reparametrisation of the stream, and LVS that a function-preserving rescale leaves unchanged
while the relative budget's moves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentaudit.interventions.budget import RelativeBudget, WhitenedBudget
from latentaudit.interventions.whiten import Whitening, estimate_whitening, ledoit_wolf
from latentaudit.models.loader import load_model
from test_construct import _rms_on_projected


def test_ledoit_wolf_shrinks_little_with_many_samples_and_much_with_few():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=g)
    many = torch.randn(4000, 16, generator=g) @ a
    few = torch.randn(12, 16, generator=g) @ a
    mu, cov, lam = ledoit_wolf(many)
    assert lam < 0.05 and torch.allclose(mu, many.mean(0), atol=1e-5)
    assert torch.allclose(cov, torch.cov(many.T, correction=0).float(), rtol=0.1, atol=0.5)
    assert ledoit_wolf(few)[2] > 3 * lam and ledoit_wolf(many, 0.0)[2] == 0.0


def test_the_whitened_ball_maps_onto_itself_under_an_invertible_map():
    """Σ' = PΣPᵀ: ‖Σ'^-1/2 Pδ‖ = ‖Σ^-1/2 δ‖ for every δ, and the budget's δ = Σ^1/2 u maps
    to a δ' = Σ'^1/2 u' with ‖u'‖ = ‖u‖ (the attack's coordinates turn by a rotation)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 8, generator=g) @ torch.randn(8, 8, generator=g)
    p = torch.eye(8) + 3.0 * torch.outer(torch.ones(8), torch.ones(8)) / 8  # invertible
    w1 = Whitening(*[{0: t} for t in ledoit_wolf(x, 0.0)[:2]])
    w2 = Whitening(*[{0: t} for t in ledoit_wolf(x @ p.T, 0.0)[:2]])
    b1, b2 = WhitenedBudget(w1), WhitenedBudget(w2)
    d = torch.randn(5, 8, generator=g)
    n1 = b1.from_delta(d, 0).norm(dim=-1)
    n2 = b2.from_delta(d @ p.T, 0).norm(dim=-1)
    assert torch.allclose(n1, n2, rtol=1e-3)
    u = torch.randn(5, 8, generator=g)
    back = b2.from_delta(b1.to_delta(u, 0) @ p.T, 0)
    assert torch.allclose(back.norm(dim=-1), u.norm(dim=-1), rtol=1e-3)


def test_noise_and_steer_pushes_lie_on_the_whitened_balls_surface():
    """surface(): ‖Σ^-1/2 δ_t‖ = ε√d at every allowed position, 0 elsewhere; direction(r̂)
    gives a push along r̂ (steer), under the relative budget r̂ itself."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2000, 6, generator=g) @ torch.randn(6, 6, generator=g)
    b = WhitenedBudget(Whitening(*[{0: t} for t in ledoit_wolf(x)[:2]]))
    h = torch.randn(5, 6, generator=g)
    mask = torch.tensor([True, True, False, True, True])
    u = torch.randn(5, 6, generator=g)
    u = u / u.norm(dim=-1, keepdim=True)
    delta = b.surface(h, 0.3, u, 0, mask)
    norms = b.from_delta(delta, 0).norm(dim=-1)
    assert torch.allclose(norms[mask], torch.full((4,), 0.3 * 6 ** 0.5), rtol=1e-4)
    assert norms[2] == 0
    r = torch.nn.functional.normalize(torch.randn(6, generator=g), dim=0)
    push = b.surface(h[:1], 0.3, b.direction(r[None], 0), 0)[0]
    assert torch.allclose(push / push.norm(), r, atol=1e-5)
    assert torch.equal(RelativeBudget().direction(r[None], 0)[0], r)


def _judge_and_guard():
    from latentaudit.judges.base import Judge, Verdict
    from latentaudit.judges.coherence import CoherenceGuard

    class ParityJudge(Judge):
        """A deterministic function of the text: the same answers get the same verdicts."""
        name = "parity"

        def judge(self, prompts, responses):
            return [Verdict("compliance" if len(r) % 2 else "refusal", 0.0, "t")
                    for r in responses]

    return ParityJudge(), CoherenceGuard(min_logprob=-1e9)


@pytest.mark.parametrize("k", [8.0, 0.125])
def test_a_function_preserving_rescale_leaves_whitened_lvs_unchanged_and_moves_relative(
        tmp_path, k):
    """A tiny model and its rescale (the refusal-like subspace written k× quieter and read k×
    louder; the original runs with each RMSNorm reading rms(Ph), so the two compute exactly the
    same function). Under the whitened budget (each model's own covariance) PGD's losses and
    every prompt's ε* agree; under the relative budget they do not."""
    from latentaudit.construct.abliterate import orthonormal_basis
    from latentaudit.construct.rescale import rescale_subspace
    from latentaudit.data.sets import load_prompt_set
    from latentaudit.runs.store import ResultStore
    from latentaudit.stages.latent import LatentConfig, LatentRunner, run_latent

    lm1 = load_model("tiny:llama", device="cpu")
    lm2 = load_model("tiny:llama", device="cpu")
    g = torch.Generator().manual_seed(5)
    rs = [torch.randn(lm1.parts.hidden_size, generator=g) for _ in range(2)]
    q = orthonormal_basis(rs)
    p = torch.eye(q.shape[0]) - (1 - 1 / k) * q @ q.T
    rescale_subspace(lm2, rs, k)
    lm2.set_model(lm2.model)
    handles = _rms_on_projected(lm1, p)
    try:
        harmless = load_prompt_set("builtin:harmless:train", limit=48).texts
        ps = load_prompt_set("builtin:harmful:test", limit=6)
        cfg = LatentConfig(layers="1,2", families=["pgd"], max_new_tokens=6, rel_tol=0.1,
                           family_params={"pgd": {"steps": 4, "check_every": 0}})
        judge, guard = _judge_and_guard()
        res, traces = {}, {}
        for name, lm in (("orig", lm1), ("rescaled", lm2)):
            w = estimate_whitening(lm, harmless, [1, 2], shrinkage=0.0)
            for bname, budget in (("relative", RelativeBudget()), ("whitened", WhitenedBudget(w))):
                runner = LatentRunner(lm, ResultStore(tmp_path / f"{name}-{bname}.sqlite"), "m",
                                      ps, cfg, judge, guard, budget=budget)
                s = run_latent(runner)
                res[name, bname] = [lr.eps_star for lr in s.families["pgd"].layers]
                fam = __import__("latentaudit.registry", fromlist=["create"]).create(
                    "family", "pgd", steps=4, check_every=0)
                _, tr = fam.attack(runner.ctx, 1, list(range(len(ps))), np.full(len(ps), 0.05),
                                   return_trace=True)
                traces[name, bname] = tr
    finally:
        for h in handles:
            h.remove()
    # what PGD gained over its steps, per prompt: the same under the whitened budget, not
    # under the relative one (k > 1: a push along the subspace acts k× harder; k < 1: ‖h‖
    # grows with the louder component and the relative ball with it)
    gain = {key: tr[0] - tr[-1] for key, tr in traces.items()}
    assert torch.allclose(gain["orig", "whitened"], gain["rescaled", "whitened"], rtol=1e-2,
                          atol=1e-5)
    flat = {key: [e if e is not None else np.inf for lay in v for e in lay] for key, v in res.items()}
    assert np.allclose(flat["orig", "whitened"], flat["rescaled", "whitened"], rtol=1e-3)
    ratio = (gain["rescaled", "relative"] / gain["orig", "relative"]).mean()
    assert abs(float(ratio) - 1) > 0.2, ratio
