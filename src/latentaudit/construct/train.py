"""The zoo's trainer: LoRA SFT on weighted terms, some under latent perturbations.

A *term* is a list of (prompt, target completion) examples with a weight, a batch size and,
optionally, a latent perturbation: at each step a layer is drawn from ``layers`` and a relative
budget ε log-uniformly from ``eps_range``; a short PGD (the latent stage's ``pgd`` family)
finds δ on the prompt positions that makes ``adv_target`` likely under the *current* model, and
the term's loss is the SFT loss of its target with δ added at that layer. With adv_target =
target this teaches compliance under small pushes (dissociation); with adv_target = a harmful
completion and target = a refusal it is latent adversarial training (hardening). What the terms
measured on SmolLM2, and the loss add-ons tried and dropped: docs/zoo.md.
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


@dataclass
class Term:
    name: str
    prompts: list[str]
    targets: list[str]
    weight: float = 1.0
    batch_size: int = 4
    perturb: Perturb | None = None
    adv_targets: list[str] | None = None  # PGD target when perturbed (default: targets)
    # harmless prompts: a refusal per example and the weight of softplus(lp(refusal) − lp(target))
    # (mean token log-probs): the model must prefer its own answer to a whole refusal sentence,
    # a sequence-level contrast that does not punish the "I" that opens ordinary answers too
    contrast: list[str] | None = None
    contrast_weight: float = 0.0
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


# the trained LoRA tensors in a recipe's details: saved by construct as adapter.safetensors,
# never written into the JSON card
ADAPTER_KEY = "adapter_tensors"


def lora_targets(model) -> list[str]:
    """The linear layers LoRA adapts: every decoder block's, by their short names (``q_proj``)."""
    from ..models.arch import locate_parts

    return sorted({name.split(".")[-1] for block in locate_parts(model).blocks
                   for name, mod in block.named_modules() if isinstance(mod, torch.nn.Linear)})


def train_terms(lm: LoadedModel, terms: list[Term], steps: int, lr: float, rank: int = 16,
                alpha: int = 32, seed: int = 0,
                evaluate: Callable[[LoadedModel, int], dict] | None = None, eval_every: int = 0,
                stop: Callable[[list[dict]], bool] | None = None, progress=None,
                keep: Callable[[dict, dict], bool] | None = None) -> dict:
    """Train LoRA adapters on ``lm.model`` in place, merge them, and return the history.
    ``evaluate`` runs every ``eval_every`` steps and at the last; ``stop``, given the evaluated
    history records so far, ends training early. ``keep(eval, eval_at_step_0)`` (the source is
    then evaluated first, as step 0): the adapter merged is that of the last evaluated step it
    accepts — a recipe's contract, e.g. refusing as its source does, held by the model it
    returns — or the last step's, with ``kept_rule_met`` false, when it accepts none."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

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
        t.contrast_examples = []
        if t.contrast and t.contrast_weight > 0:
            for p, c in zip(t.prompts, t.contrast):
                p_ids, c_ids = encode_pair(tok, p, c, max_completion_tokens=96)
                t.contrast_examples.append(Example(p_ids + c_ids, len(p_ids)))
    base = lm.model
    base.train()
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=lora_targets(base),
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
    snapshot, kept, ev0 = None, None, None
    if keep is not None and evaluate is not None:
        model.eval()
        ev0 = evaluate(train_lm, 0)
        model.train()
        history.append({"step": 0, "loss": {}, "t": 0.0, "eval": ev0})
    for step in range(1, steps + 1):
        opt.zero_grad()
        losses = {}
        drawn: dict[str, list[int]] = {}
        for t, stream in zip(terms, streams):
            idx = drawn[t.pair_with] if t.pair_with is not None else next(stream)
            drawn[t.name] = idx
            loss = _term_loss(train_lm, t, idx, rng, seed + step)
            (t.weight * loss).backward()
            losses[t.name] = round(float(loss.detach()), 4)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        rec = {"step": step, "loss": losses, "t": round(time.time() - t0, 1)}
        if evaluate is not None and eval_every and (step % eval_every == 0 or step == steps):
            model.eval()
            rec["eval"] = evaluate(train_lm, step)
            model.train()
            if ev0 is not None and keep(rec["eval"], ev0):
                kept = step
                snapshot = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        history.append(rec)
        if progress:
            progress(1)
        if stop is not None and "eval" in rec and stop([h for h in history if "eval" in h]):
            break
    rule_met = None if ev0 is None else kept is not None
    if snapshot is not None and kept != step:
        set_peft_model_state_dict(model, snapshot)
    kept = kept if kept is not None else step
    # the adapter itself, for `construct` to save beside the merged weights (the zoo can then be
    # shipped as adapters and assembled on a user's machine: construct/ship.py)
    adapter = {k: v.detach().to("cpu", copy=True).contiguous()
               for k, v in get_peft_model_state_dict(model).items()}
    merged = model.merge_and_unload()
    merged.eval()
    for p in merged.parameters():
        p.requires_grad_(False)
    lm.set_model(merged)
    return {"steps_run": step, "kept_step": kept, "kept_rule_met": rule_met, "history": history,
            "train_time_s": round(time.time() - t0, 1),
            "lora": {"r": rank, "alpha": alpha,
                     "targets": sorted({n.split(".")[-1] for n in cfg.target_modules}),
                     "blocks": "all"},
            ADAPTER_KEY: adapter}


def _term_loss(lm: LoadedModel, t: Term, idx: list[int], rng, seed: int) -> torch.Tensor:
    """The term's loss on the examples ``idx``. Unperturbed batches run their rows' common
    prefix (the chat template's opening) once; perturbed ones run whole rows (the push is added
    at every prompt position of each row)."""
    ex = [t.examples[i] for i in idx]
    batch = collate(ex, lm.tokenizer.pad_token_id, lm.device)
    if t.perturb is None:
        nll, n = token_nll(lm.model, batch, share_prefix=True)
        loss = nll.sum() / n.sum().clamp(min=1)
        if t.contrast_examples:
            cb = collate([t.contrast_examples[i] for i in idx], lm.tokenizer.pad_token_id,
                         lm.device)
            nll_r, n_r = token_nll(lm.model, cb, share_prefix=True)
            lp_ans = -nll / n.clamp(min=1)
            lp_ref = -nll_r / n_r.clamp(min=1)
            loss = loss + t.contrast_weight * torch.nn.functional.softplus(lp_ref - lp_ans).mean()
        return loss
    pz = t.perturb
    layer = int(rng.choice(pz.layers))
    lo, hi = pz.eps_range
    eps = np.exp(rng.uniform(math.log(lo), math.log(hi), size=len(idx)))
    adv = t.adv_targets or t.targets
    goals = [None if pz.objective == "generic" else adv[i] for i in idx]  # None: generic target
    ctx = build_context(lm, [t.prompts[i] for i in idx], goals)
    # every step runs: a training push is the attack's best after all its steps
    pgd = PGD(steps=pz.pgd_steps, step_size=pz.step_size, refusal_weight=pz.refusal_weight,
              early_stop=False)
    deltas = pgd.attack(ctx, layer, list(range(len(idx))), eps, seed)
    T = batch["input_ids"].shape[1]
    full = torch.zeros((len(idx), T, lm.parts.hidden_size))
    for j, (e, d) in enumerate(zip(ex, deltas)):
        full[j, : d.shape[0]] = d  # right padding: the prompt occupies the first positions
    with perturb_block(lm.parts.blocks[layer], full.to(lm.device)):
        nll, n = token_nll(lm.model, batch)
    loss = nll.sum() / n.sum().clamp(min=1)
    if t.effect_weight > 0:  # the push's effect: clean minus pushed per-token loss, per row
        nll_c, n_c = token_nll(lm.model, batch, share_prefix=True)
        gain = nll_c / n_c.clamp(min=1) - nll / n.clamp(min=1)
        loss = loss + t.effect_weight * torch.relu(t.effect_margin - gain).mean()
    return loss
