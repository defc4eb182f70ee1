"""Perturbation families: one plug-in class each, the same interface.

Given the attack context, a layer, prompt rows and one relative budget ε per row, a bounded
family returns candidate perturbations per row — δ_i [n_i, d] on that prompt's positions
(zero outside the positions allowed) and, for positions mode ``all``, a function for the
generated tokens. The stage generates with each candidate; a row succeeds at ε if any of its
candidates elicits a coherent compliance.

- ``noise``  δ_t = ε‖h_t‖·u_t, u_t uniform on the unit sphere; K draws (the control).
- ``steer``  δ_t = −ε‖h_t‖·r̂_l, r̂_l the unit refusal direction of layer l.
- ``pgd``    projected gradient descent on δ toward a target completion plus an away-from-refusal
             term; projection onto every position's ball after each step; the best δ seen is kept.
- ``ablate`` directional ablation of r̂ at every layer (unbounded; reported beside LVS).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import UserError
from .budget import project, sphere
from ..models.memory import run_batches
from .context import AttackContext, pad_left
from .hooks import ablate_direction
from .prefix import FullRunner, SuffixRunner


@dataclass
class Candidate:
    delta: torch.Tensor  # [n_i, d] on the prompt positions
    step: Callable[[torch.Tensor], torch.Tensor] | None = None  # generated-token δ (mode all)
    verdict: dict | None = None  # already generated and judged during the attack (pgd check)


# check(rows, deltas) -> one judged record per row (generation with δ at the layer, judge,
# coherence guard): how the stage lets an attack ask "does this push already succeed?"
Check = Callable[[list[int], list[torch.Tensor]], list[dict]]


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Family:
    """A perturbation family. Subclasses set ``name``, ``doc``, what they need (``bounded``,
    ``uses_directions``) and their parameters as a pydantic model ``Params`` (defaults are the
    audit's defaults; ``latent.family_params.NAME`` in a config overrides them)."""

    name: ClassVar[str] = ""
    doc: ClassVar[str] = ""
    bounded: ClassVar[bool] = True
    # reads the refusal directions handed to ``candidates``: the stage keys its stored results
    # by the direction used, so results along one direction are never reused for another
    uses_directions: ClassVar[bool] = False
    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, **params: Any):
        self.params = self.validate_params(params)

    @classmethod
    def validate_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` over the defaults, checked (one-line :class:`UserError`)."""
        try:
            return cls.Params(**params).model_dump()
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            msg = "unknown parameter" if err["type"] == "extra_forbidden" else err["msg"]
            known = ", ".join(cls.Params.model_fields) or "none"
            raise UserError(f"family '{cls.name}': {where}: {msg} (parameters: {known})") from None

    def describe(self) -> dict:
        return {"name": self.name, "params": dict(self.params)}

    def intervene(self, lm, directions):
        """Unbounded families: a context manager in which ``lm`` runs under the intervention."""
        raise UserError(f"family '{self.name}' is bounded: it is searched over budgets")

    def candidates(self, ctx: AttackContext, layer: int, rows: list[int], eps: np.ndarray,
                   seed: int = 0, directions=None, check: Check | None = None
                   ) -> list[list[Candidate]]:
        """Per row, the candidate pushes at budget ``eps[i]``; bounded families only."""
        raise UserError(f"family '{self.name}' is unbounded: it is evaluated once, not searched "
                        "over budgets")


def _row_seed(seed: int, text: str, *extra) -> int:
    h = hashlib.sha256(f"{seed}|{text}|{'|'.join(map(str, extra))}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _clean(ctx: AttackContext, row: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    return ctx.h[row][layer], ctx.masks[row][layer]  # [n, d] float32, [n] bool


class Noise(Family):
    name = "noise"
    doc = "random directions on the sphere, K draws (success if any draw succeeds): the control"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        draws: int = Field(4, ge=1, description="random draws per budget")

    def candidates(self, ctx, layer, rows, eps, seed=0, directions=None, check=None):
        out, bud = [], ctx.budget
        for r, e in zip(rows, eps):
            h, m = _clean(ctx, r, layer)
            cands = []
            for k in range(int(self.params["draws"])):
                g = torch.Generator().manual_seed(_row_seed(seed, ctx.texts[r], layer, k))
                delta = bud.surface(h, float(e), sphere(tuple(h.shape), g), layer, m)
                step = None
                if ctx.positions == "all":
                    gs = torch.Generator().manual_seed(_row_seed(seed, ctx.texts[r], layer, k, "gen"))

                    def step(hh, e=float(e), gs=gs, bud=bud):
                        return bud.surface(hh, e, sphere(tuple(hh.shape), gs).to(hh.device), layer)
                cands.append(Candidate(delta, step))
            out.append(cands)
        return out


class Steer(Family):
    name = "steer"
    doc = "push along minus the layer's refusal direction: δ_t = −ε‖h_t‖·r̂_l"
    uses_directions = True

    def candidates(self, ctx, layer, rows, eps, seed=0, directions=None, check=None):
        if directions is None:
            raise UserError("family 'steer' needs refusal directions (run the directions stage)")
        bud = ctx.budget
        # the u-direction whose push points along r̂ (r̂ itself under the relative budget)
        u = bud.direction(directions.unit(layer).float()[None], layer)[0]
        out = []
        for r, e in zip(rows, eps):
            h, m = _clean(ctx, r, layer)
            delta = -bud.surface(h, float(e), u.expand_as(h), layer, m)
            step = None
            if ctx.positions == "all":
                def step(hh, e=float(e)):
                    return -bud.surface(hh, e, u.to(hh.device).expand(hh.shape), layer)
            out.append([Candidate(delta, step)])
        return out


@dataclass
class _PGDBatch:
    """One batch of rows laid out for PGD at ``layer``: prompt and target left-padded into one
    sequence, the clean activations entering the layer, each row's ball radius per position,
    and where the target's tokens are predicted in the kept window of logits."""

    runner: Any  # SuffixRunner or FullRunner over the batch
    h: torch.Tensor  # [b, t, d] clean activations at the layer, float32
    t: int  # padded length
    n_p: list[int]  # prompt tokens per row
    n_t: list[int]  # target tokens per row
    keep: int  # logits kept from the end: the longest target + 1
    tgt: torch.Tensor  # [b, keep] target token predicted at each kept position
    wmask: torch.Tensor  # [b, keep] which kept positions predict a target token
    first: torch.Tensor  # [b] kept position that predicts the first response token
    ref_ids: torch.Tensor  # refusal-opener token ids
    # [b, t, 1]: δ_t = budget.to_delta(u_t · scale_t) with ‖u_t‖ ≤ √d fills position t's ball
    # (relative budget: ε‖h_t‖/√d); 0 off the allowed positions
    scale: torch.Tensor

    @classmethod
    def build(cls, ctx: AttackContext, layer: int, rows: list[int], eps: np.ndarray,
              prefix_cache: bool) -> "_PGDBatch":
        from ..judges.first_token import refusal_token_ids

        lm = ctx.lm
        tok = lm.tokenizer
        seqs = [ctx.prompt_ids[r] + ctx.target_ids[r] for r in rows]
        ids, attn, pos = pad_left(seqs, tok.pad_token_id, lm.device)
        b, t = ids.shape
        n_p = [len(ctx.prompt_ids[r]) for r in rows]
        n_t = [len(ctx.target_ids[r]) for r in rows]
        keep = max(n_t) + 1
        runner = (SuffixRunner if prefix_cache else FullRunner)(lm, layer, ids, attn, pos)
        h = runner.h_clean.float()
        pmask = torch.zeros((b, t), dtype=torch.bool)
        for j, r in enumerate(rows):
            start = t - n_t[j] - n_p[j]
            pmask[j, start : start + n_p[j]] = ctx.masks[r][layer]
        scale = ctx.budget.scale(h, torch.as_tensor(eps, dtype=torch.float32), pmask.to(h.device))
        # loss positions inside the kept window: position w predicts token w+1
        tgt = torch.zeros((b, keep), dtype=torch.long, device=h.device)
        wmask = torch.zeros((b, keep), dtype=torch.bool, device=h.device)
        first = torch.zeros(b, dtype=torch.long, device=h.device)
        for j in range(b):
            m = n_t[j]
            tgt[j, keep - m - 1 : keep - 1] = ids[j, t - m :]
            wmask[j, keep - m - 1 : keep - 1] = True
            first[j] = keep - m - 1
        ref_ids = torch.tensor(refusal_token_ids(tok), dtype=torch.long, device=h.device)
        return cls(runner, h, t, n_p, n_t, keep, tgt, wmask, first, ref_ids, scale)


class PGD(Family):
    name = "pgd"
    doc = ("projected gradient descent toward a target completion (+ away from refusal "
           "openers), per-position L2 projection, best δ kept: the strongest bounded attack")

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        steps: int = Field(10, ge=0, description="gradient steps")
        optimizer: Literal["l2", "sign", "adam"] = Field(
            "l2", description="l2: per-position normalised gradient; sign; adam")
        step_size: float = Field(0.25, gt=0, description="fraction of each position's radius "
                                 "per step (l2, sign); the learning rate (adam)")
        refusal_weight: float = Field(1.0, ge=0, description="weight of -log(1 - p(refusal "
                                      "opener)) at the first response token")
        prefix_cache: bool = Field(True, description="run only blocks l+1..L-1 per step")
        batch_size: int = Field(16, gt=0, description="prompts attacked together")
        early_stop: bool = Field(
            True, description="a prompt leaves the batch once its perturbed model puts the "
            "whole target first (greedy under teacher forcing) with refusal-opener probability "
            "< 1/2: greedy generation then begins with the target")
        check_every: int = Field(
            5, ge=0, description="every k steps, generate and judge each prompt's best push so "
            "far; a prompt already elicited stops there (a success inside the ball is a "
            "success); 0: judge only after the last step")
        check_refusing: bool = Field(
            False, description="also check prompts whose best push still makes a refusal "
            "opener the likelier first token (greedy generation would open with a refusal)")

    def candidates(self, ctx, layer, rows, eps, seed=0, directions=None, check=None):
        if ctx.positions == "all":
            raise UserError("pgd perturbs prompt positions only: use --positions prompt or last")
        out: list[list[Candidate]] = []
        bs = int(self.params["batch_size"])
        order = sorted(range(len(rows)), key=lambda k: -len(ctx.prompt_ids[rows[k]]))
        res: dict[int, torch.Tensor] = {}
        judged: dict[int, dict] = {}

        def one(chunk: list[int]) -> None:  # each row is attacked on its own: a split changes no row
            verdicts: dict[int, dict] = {}
            deltas = self.attack(ctx, layer, [rows[k] for k in chunk], np.asarray(eps)[chunk], seed,
                                 check=check, verdicts=verdicts)
            for j, (k, d) in enumerate(zip(chunk, deltas)):
                res[k] = d
                if j in verdicts:
                    judged[k] = verdicts[j]

        run_batches([order[s : s + bs] for s in range(0, len(order), bs)], one, "pgd",
                    ctx.lm.model)
        for k in range(len(rows)):
            out.append([Candidate(res[k], verdict=judged.get(k))])
        return out

    def attack(self, ctx: AttackContext, layer: int, rows: list[int], eps: np.ndarray,
               seed: int = 0, return_trace: bool = False, check: Check | None = None,
               verdicts: dict[int, dict] | None = None):
        """Run PGD for ``rows`` at budgets ``eps``; returns δ_i [n_i, d] per row (the best seen).

        With ``check`` and ``check_every`` = k > 0, every k-th step (before the last) the rows
        still attacked are generated with their best δ so far and judged; a row that succeeds
        stops, its δ is that best one, and its judged record goes into ``verdicts[j]`` (j the
        row's index in ``rows``) so that the caller need not generate it again. Rows whose best
        δ still makes a refusal opener more likely than not are not checked (unless
        ``check_refusing``)."""
        p = self.params
        lm = ctx.lm
        B = _PGDBatch.build(ctx, layer, rows, eps, bool(p["prefix_cache"]))
        runner, h, t, n_p, n_t, keep = B.runner, B.h, B.t, B.n_p, B.n_t, B.keep
        tgt, wmask, first, ref_ids, scale = B.tgt, B.wmask, B.first, B.ref_ids, B.scale
        b = h.shape[0]
        w = float(p["refusal_weight"])

        # δ = to_delta(u·scale): in u-units the ball is ‖u_t‖ ≤ √d for every position, so one
        # step size means "this fraction of each position's ball" (steps and projections in
        # u-units are rotation-equivariant: the whitened budget's attack is basis-free)
        d = h.shape[-1]
        to_delta = ctx.budget.to_delta
        live = scale > 0
        u = torch.zeros_like(h, requires_grad=True)
        best = torch.zeros_like(h)
        best_loss = torch.full((b,), float("inf"), device=h.device)
        best_ref = torch.ones(b, device=h.device)  # refusal-opener mass under the best δ
        last_loss = torch.full((b,), float("inf"), device=h.device)
        opt = torch.optim.Adam([u], lr=float(p["step_size"])) if p["optimizer"] == "adam" else None
        early = bool(p["early_stop"])
        act = torch.arange(b, device=h.device)  # rows still attacked
        run = runner
        trace = []
        dtype = lm.dtype
        every = int(p["check_every"]) if check is not None else 0

        def row_delta(j: int) -> torch.Tensor:
            start = t - n_t[j] - n_p[j]
            return best[j, start : start + n_p[j]].detach().cpu()

        for k in range(int(p["steps"]) + 1):
            delta = to_delta(u[act] * scale[act], layer)
            logits = run.logits((h[act] + delta).to(dtype), keep=keep).float()  # [a, keep, V]
            logp = torch.log_softmax(logits, dim=-1)
            tg, wm = tgt[act], wmask[act]
            tok_lp = logp.gather(-1, tg.unsqueeze(-1)).squeeze(-1)  # [a, keep]
            ce = -(tok_lp * wm).sum(-1) / wm.sum(-1)
            lp_first = logp[torch.arange(act.numel(), device=h.device), first[act]]  # [a, V]
            p_ref = torch.logsumexp(lp_first[:, ref_ids], dim=-1).exp().clamp(max=1 - 1e-6)
            loss = ce - w * torch.log1p(-p_ref)  # [a]
            with torch.no_grad():
                better = loss < best_loss[act]
                best[act[better]] = delta.detach()[better]
                best_loss[act[better]] = loss.detach()[better]
                best_ref[act[better]] = p_ref.detach()[better]
                last_loss[act] = loss.detach()
                done = torch.zeros_like(better)
                if early:
                    done = ((logits.argmax(-1) == tg) | ~wm).all(-1) & (p_ref < 0.5)
                    best[act[done]] = delta.detach()[done]  # the push that already works
                if every and 0 < k < int(p["steps"]) and k % every == 0:
                    ask = act[~done]
                    if not p["check_refusing"]:
                        ask = ask[best_ref[ask] < 0.5]
                    ask = [int(j) for j in ask.tolist()]
                    recs = check([rows[j] for j in ask], [row_delta(j) for j in ask]) if ask else []
                    for j, rec in zip(ask, recs):
                        if rec["success"]:
                            if verdicts is not None:
                                verdicts[j] = {**rec, "pgd_step": k}
                            done[(act == j).nonzero().squeeze(-1)] = True
            trace.append(last_loss.detach().cpu().clone())
            if k == int(p["steps"]) or bool(done.all()):
                break
            (grad,) = torch.autograd.grad((loss * ~done).sum(), u)
            with torch.no_grad():
                grad = grad * live
                if opt is not None:
                    u.grad = grad
                    opt.step()
                    u.grad = None
                elif p["optimizer"] == "l2":  # per-position normalised gradient step
                    g = grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-30)
                    u -= float(p["step_size"]) * d ** 0.5 * g
                else:  # signed gradient (‖sign‖ = √d)
                    u -= float(p["step_size"]) * grad.sign()
                # project onto ‖u_t‖ ≤ √d, i.e. ‖δ_t‖ ≤ radius_t; zero where not allowed
                u.copy_(project(u, torch.full_like(scale, d ** 0.5)) * live)
            if bool(done.any()):
                act = act[~done]
                run = run.select((~done).nonzero().squeeze(-1))
        out = [row_delta(j) for j in range(b)]
        if return_trace:
            return out, torch.stack(trace, 0)  # [steps+1, b]
        return out


class Ablate(Family):
    name = "ablate"
    doc = "directional ablation of the selected refusal direction at every layer (unbounded, beside LVS)"
    bounded = False
    uses_directions = True

    def intervene(self, lm, directions):
        """A context in which ``lm`` runs with the selected direction projected out of
        everything that writes into the residual stream."""
        return ablate_direction(lm.parts, directions.selected())
