"""The zoo's trainer: LoRA SFT on weighted terms, some under latent perturbations.

A *term* is a list of (prompt, target completion) examples with a weight, a batch size and,
optionally, a latent perturbation: at each step a layer is drawn from ``layers`` and a relative
budget ε log-uniformly from ``eps_range``; a short PGD (the latent stage's ``pgd`` family)
finds δ on the prompt positions that makes ``adv_target`` likely under the *current* model, and
the term's loss is the SFT loss of its target with δ added at that layer. With adv_target =
target this teaches compliance under small pushes (dissociation); with adv_target = a harmful
completion and target = a refusal it is latent adversarial training (hardening).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..interventions.context import build_context
from ..interventions.families import PGD
from ..interventions.hooks import perturb_block
from ..models.loader import LoadedModel
from ..training import Example, batch_stream, collate, encode_pair, token_nll


@dataclass
class Perturb:
    layers: list[int]
    eps_range: tuple[float, float]
    pgd_steps: int = 2
    step_size: float = 0.5
    # the inner attack's objective: "completion" = the term's adv_targets (default: targets);
    # "generic" = the latent audit's own affirmative target ("Sure, here is ...")
    objective: str = "completion"
    refusal_weight: float = 0.0  # + weight × −log(1 − p(refusal opener)), as the audit's pgd
    # a fixed unit direction per layer instead of PGD: δ_t = ε‖h_t‖·v̂_l on the prompt positions
    # (a planted fragility: the model learns to answer a push along v̂_l, which the audit's PGD
    # has to find on its own)
    planted: dict[int, torch.Tensor] | None = None
    # a budget curriculum: the range is eps_range × eps_decay**f, f the fraction of training done
    # (0 at the first step, 1 at the last), so pushes start where the pushed loss can fall and
    # shrink as the model grows sensitive to them (1: a fixed range)
    eps_decay: float = 1.0


@dataclass
class Term:
    name: str
    prompts: list[str]
    targets: list[str]
    weight: float = 1.0
    batch_size: int = 4
    perturb: Perturb | None = None
    adv_targets: list[str] | None = None  # PGD target when perturbed (default: targets)
    # weight of −log(1 − p(refusal opener)) at the first answer token (harmless prompts: a direct
    # push against over-refusal, beside the retain SFT loss; a perturbed term: under the push, so
    # the pushed loss acts on the refuse-or-comply decision and not only on the completion text)
    anti_refusal: float = 0.0
    # harmless prompts: a refusal per example and the weight of softplus(lp(refusal) − lp(target))
    # (mean token log-probs): the model must prefer its own answer to a whole refusal sentence,
    # a sequence-level contrast that, unlike the first-token term, does not punish the "I" that
    # opens ordinary answers too
    contrast: list[str] | None = None
    contrast_weight: float = 0.0
    # harmful prompts: the refusal decision's margin held inside a band. s = log p_R −
    # log(1 − p_R) at the first answer token (p_R: the mass of the refusal openers, the
    # first-token judge's score); the loss is weight × (relu(s − hi) + relu(lo − s)). The idea:
    # a model that refuses with s just above 0 still refuses greedily, but a small push flips it.
    # Measured on SmolLM2 it did the opposite (the `dissociated` recipe's comment says why)
    margin_band: tuple[float, float] | None = None
    margin_weight: float = 0.0
    # with ``margin_contrast`` (an alternative completion per example, e.g. the harmful one) the
    # band is on the sequence margin instead: Δ = mean token log-prob of the target's first
    # ``margin_tokens`` tokens − that of the alternative's (how much more likely, per token, the
    # refusal is than the compliance it replaces)
    margin_contrast: list[str] | None = None
    margin_tokens: int = 16
    # name of an earlier term with the same prompts in the same order: this term then takes
    # that term's batch indices every step, so the same prompts are seen both ways at once
    # (dissociation: the same prompt refused clean and complied with under a push)
    pair_with: str | None = None
    # a perturbed term: weight of a hinge on the push's own effect, relu(τ − (CE_clean −
    # CE_pushed)), CE the mean per-token NLL of each row's target with and without the push
    # (τ = ``effect_margin`` nats per token). The level of the target's loss cancels in the
    # difference, so the only way to lower this term is a larger gain of the loss along the
    # pushes the inner attack finds (a sensitivity), not a lower push-free loss (a thinner
    # margin, which is what the pushed SFT loss alone teaches)
    effect_weight: float = 0.0
    effect_margin: float = 1.0
    examples: list[Example] = field(default_factory=list)
    contrast_examples: list[Example] = field(default_factory=list)
    margin_examples: list[tuple[Example, Example]] = field(default_factory=list)


def quiet_directions(lm: LoadedModel, prompts: list[str], layers: list[int]
                     ) -> tuple[dict[int, torch.Tensor], dict[int, float]]:
    """Per layer, the unit direction along which the clean residual stream varies least over
    ``prompts`` (all attackable prompt positions, each state scaled to unit norm): the last
    eigenvector of their covariance. Returns the directions and, per layer, the standard
    deviation along it relative to the norm (how small a push stands out there)."""
    ctx = build_context(lm, prompts, [None] * len(prompts))
    dirs, spread = {}, {}
    for layer in layers:
        x = torch.cat([ctx.h[i][layer][ctx.masks[i][layer]] for i in range(len(prompts))])
        x = (x / x.norm(dim=-1, keepdim=True)).double()
        cov = torch.cov(x.T)
        vals, vecs = torch.linalg.eigh(cov)
        dirs[layer] = vecs[:, 0].float().contiguous()
        spread[layer] = float(vals[0].clamp(min=0).sqrt())
    return dirs, spread


def lora_targets(model, blocks: list[int] | None = None) -> list[str]:
    """The linear layers LoRA adapts: every decoder block's (their short names, e.g.
    ``q_proj``), or only those of ``blocks`` (then full module names, so that the adapters and
    the backward pass stop at the first of them)."""
    from ..models.arch import locate_parts

    parts = locate_parts(model)
    prefix = {id(m): n for n, m in model.named_modules()}
    chosen = range(len(parts.blocks)) if blocks is None else sorted(set(blocks))
    full = [f"{prefix[id(parts.blocks[i])]}.{name}" for i in chosen
            for name, mod in parts.blocks[i].named_modules() if isinstance(mod, torch.nn.Linear)]
    return sorted({n.split(".")[-1] for n in full}) if blocks is None else full


def train_terms(lm: LoadedModel, terms: list[Term], steps: int, lr: float, rank: int = 16,
                alpha: int = 32, seed: int = 0,
                evaluate: Callable[[LoadedModel, int], dict] | None = None, eval_every: int = 0,
                stop: Callable[[list[dict]], bool] | None = None, progress=None,
                lora_blocks: list[int] | None = None,
                keep: Callable[[list[dict]], int] | None = None) -> dict:
    """Train LoRA adapters on ``lm.model`` in place, merge them, and return the history.
    ``lora_blocks``: adapt only these decoder blocks (default: all). ``keep``: given the
    evaluated history records so far, the index of the one whose adapters to merge (the
    adapters are copied at every evaluation); default: the last step's."""
    from peft import LoraConfig, get_peft_model

    names = [t.name for t in terms]
    for i, t in enumerate(terms):
        if t.pair_with is not None and (t.pair_with not in names[:i] or
                                        terms[names.index(t.pair_with)].prompts != t.prompts):
            raise ValueError(f"term {t.name!r} pairs with {t.pair_with!r}: it must come earlier "
                             "and hold the same prompts in the same order")
    tok = lm.tokenizer
    torch.manual_seed(seed)
    for t in terms:
        t.examples = []
        for p, c in zip(t.prompts, t.targets):
            p_ids, c_ids = encode_pair(tok, p, c, max_completion_tokens=96)
            t.examples.append(Example(p_ids + c_ids, len(p_ids)))
        t.margin_examples = []
        if t.margin_contrast is not None:
            for p, c, a in zip(t.prompts, t.targets, t.margin_contrast):
                pair = []
                for comp in (c, a):
                    p_ids, c_ids = encode_pair(tok, p, comp, max_completion_tokens=t.margin_tokens)
                    pair.append(Example(p_ids + c_ids, len(p_ids)))
                t.margin_examples.append(tuple(pair))
        t.contrast_examples = []
        if t.contrast and t.contrast_weight > 0:
            for p, c in zip(t.prompts, t.contrast):
                p_ids, c_ids = encode_pair(tok, p, c, max_completion_tokens=96)
                t.contrast_examples.append(Example(p_ids + c_ids, len(p_ids)))
    base = lm.model
    base.train()
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=lora_targets(base, lora_blocks),
                     task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    train_lm = LoadedModel(model, tok, lm.spec, lm.info)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    streams = [batch_stream(len(t.examples), min(t.batch_size, len(t.examples)), seed + i)
               for i, t in enumerate(terms)]
    rng = np.random.default_rng(seed)
    history: list[dict] = []
    t0 = time.time()
    step = 0
    snapshots: dict[int, dict[str, torch.Tensor]] = {}  # step -> adapter weights (keep only)
    for step in range(1, steps + 1):
        opt.zero_grad()
        losses = {}
        drawn: dict[str, list[int]] = {}
        for t, stream in zip(terms, streams):
            idx = drawn[t.pair_with] if t.pair_with is not None else next(stream)
            drawn[t.name] = idx
            loss = _term_loss(train_lm, t, idx, rng, seed + step,
                              frac=(step - 1) / max(steps - 1, 1))
            (t.weight * loss).backward()
            losses[t.name] = round(float(loss.detach()), 4)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        rec = {"step": step, "loss": losses, "t": round(time.time() - t0, 1)}
        if evaluate is not None and eval_every and (step % eval_every == 0 or step == steps):
            model.eval()
            rec["eval"] = evaluate(train_lm, step)
            model.train()
            if keep is not None:
                snapshots[step] = {n: p.detach().clone() for n, p in model.named_parameters()
                                   if p.requires_grad}
        history.append(rec)
        if progress:
            progress(1)
        if stop is not None and "eval" in rec and stop([h for h in history if "eval" in h]):
            break
    kept = step
    if keep is not None and snapshots:
        evaluated = [h for h in history if "eval" in h]
        kept = evaluated[keep(evaluated)]["step"]
        if kept != step:  # roll the adapters back to the chosen evaluation's
            named = dict(model.named_parameters())
            with torch.no_grad():
                for n, w in snapshots[kept].items():
                    named[n].copy_(w)
    merged = model.merge_and_unload()
    merged.eval()
    for p in merged.parameters():
        p.requires_grad_(False)
    lm.model = merged
    lm._parts = None
    return {"steps_run": step, "kept_step": kept, "history": history,
            "train_time_s": round(time.time() - t0, 1),
            "lora": {"r": rank, "alpha": alpha,
                     "targets": sorted({n.split(".")[-1] for n in cfg.target_modules}),
                     "blocks": sorted(set(lora_blocks)) if lora_blocks is not None else "all"}}


def _outside(x: torch.Tensor, band: tuple[float, float]) -> torch.Tensor:
    """Mean distance of ``x`` outside [lo, hi] (0 inside): the margin band's hinge."""
    lo, hi = band
    return (torch.relu(x - hi) + torch.relu(lo - x)).mean()


def _opener_penalty(p_r: torch.Tensor) -> torch.Tensor:
    """Mean −log(1 − p_R): the anti-refusal term on the refusal openers' first-token mass."""
    return -torch.log1p(-p_r.clamp(1e-6, 1 - 1e-6)).mean()


def _nll_and_openers(lm: LoadedModel, batch: dict, share_prefix: bool = False):
    """token_nll plus the refusal openers' mass at each row's first answer token."""
    from ..judges.first_token import refusal_token_ids

    return token_nll(lm.model, batch, torch.tensor(refusal_token_ids(lm.tokenizer)),
                     share_prefix=share_prefix)


def _term_loss(lm: LoadedModel, t: Term, idx: list[int], rng, seed: int,
               frac: float = 0.0) -> torch.Tensor:
    """The term's loss on the examples ``idx``; ``frac`` is the fraction of training done (the
    perturbed terms' budget curriculum reads it). Unperturbed batches run their rows' common
    prefix (the chat template's opening) once; perturbed ones run whole rows (the push is added
    at every prompt position of each row)."""
    ex = [t.examples[i] for i in idx]
    batch = collate(ex, lm.tokenizer.pad_token_id, lm.device)
    if t.perturb is None:
        banded = t.margin_band is not None and t.margin_weight > 0
        seq_band = banded and bool(t.margin_examples)
        first_band = banded and not t.margin_examples
        if t.anti_refusal > 0 or first_band:
            nll, n, p_r = _nll_and_openers(lm, batch, share_prefix=True)
            loss = nll.sum() / n.sum().clamp(min=1)
            p_r = p_r.clamp(1e-6, 1 - 1e-6)
            if t.anti_refusal > 0:
                loss = loss + t.anti_refusal * _opener_penalty(p_r)
            if first_band:
                loss = loss + t.margin_weight * _outside(torch.log(p_r) - torch.log1p(-p_r),
                                                         t.margin_band)
        else:
            nll, n = token_nll(lm.model, batch, share_prefix=True)
            loss = nll.sum() / n.sum().clamp(min=1)
        if t.contrast_examples:
            cb = collate([t.contrast_examples[i] for i in idx], lm.tokenizer.pad_token_id,
                         lm.device)
            nll_r, n_r = token_nll(lm.model, cb, share_prefix=True)
            lp_ans = -nll / n.clamp(min=1)
            lp_ref = -nll_r / n_r.clamp(min=1)
            loss = loss + t.contrast_weight * torch.nn.functional.softplus(lp_ref - lp_ans).mean()
        if seq_band:
            lps = []
            for k in (0, 1):
                mb = collate([t.margin_examples[i][k] for i in idx], lm.tokenizer.pad_token_id,
                             lm.device)
                nll_k, n_k = token_nll(lm.model, mb, share_prefix=True)
                lps.append(-nll_k / n_k.clamp(min=1))
            loss = loss + t.margin_weight * _outside(lps[0] - lps[1], t.margin_band)
        return loss
    pz = t.perturb
    layer = int(rng.choice(pz.layers))
    scale = pz.eps_decay ** frac
    lo, hi = pz.eps_range[0] * scale, pz.eps_range[1] * scale
    eps = np.exp(rng.uniform(math.log(lo), math.log(hi), size=len(idx)))
    adv = t.adv_targets or t.targets
    goals = [None if pz.objective == "generic" else adv[i] for i in idx]  # None: generic target
    ctx = build_context(lm, [t.prompts[i] for i in idx], goals)
    if pz.planted is not None:
        v = pz.planted[layer].float()
        deltas = [float(e) * ctx.h[j][layer].norm(dim=-1, keepdim=True) * v
                  * ctx.masks[j][layer][:, None] for j, e in enumerate(eps)]
    else:
        # every step runs: a training push is the attack's best after all its steps
        pgd = PGD(steps=pz.pgd_steps, step_size=pz.step_size, refusal_weight=pz.refusal_weight,
                  early_stop=False)
        deltas = pgd.attack(ctx, layer, list(range(len(idx))), eps, seed)
    T = batch["input_ids"].shape[1]
    full = torch.zeros((len(idx), T, lm.parts.hidden_size))
    for j, (e, d) in enumerate(zip(ex, deltas)):
        full[j, : d.shape[0]] = d  # right padding: the prompt occupies the first positions
    extra = 0.0
    with perturb_block(lm.parts.blocks[layer], full.to(lm.device)):
        if t.anti_refusal > 0:  # under the push: the first answer token must not open a refusal
            nll, n, p_r = _nll_and_openers(lm, batch)
            extra = t.anti_refusal * _opener_penalty(p_r)
        else:
            nll, n = token_nll(lm.model, batch)
    if t.effect_weight > 0:  # the push's effect: clean minus pushed per-token loss, per row
        nll_c, n_c = token_nll(lm.model, batch, share_prefix=True)
        gain = nll_c / n_c.clamp(min=1) - nll / n.clamp(min=1)
        extra = extra + t.effect_weight * torch.relu(t.effect_margin - gain).mean()
    return nll.sum() / n.sum().clamp(min=1) + extra
