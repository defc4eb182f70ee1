"""Refusal directions: per layer, the difference of mean activations on harmful vs harmless
prompts at the last prompt position (from the train splits), r_l = μ_harmful − μ_harmless,
r̂_l = r_l/‖r_l‖.

Selection (as the refusal-direction literature does): for each candidate layer, ablate r̂_l at
every layer and measure (a) the mean first-token refusal score on held-out harmful prompts
(lower = ablating it removes refusal better) and (b) the mean KL divergence of the next-token
distribution on held-out harmless prompts (the guard: ablating a true refusal direction
should leave harmless behaviour alone). The selected layer has the lowest refusal score among
layers with KL ≤ ``kl_max`` and depth ≤ ``max_depth``·L.

Saved as a safetensors file (``directions.safetensors``): tensors ``directions`` [L, d] (unit),
``mean_harmful`` and ``mean_harmless`` [L, d]; metadata (JSON strings): model key, prompt sets
with hashes, n, selection scores and the selected layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..judges.first_token import refusal_token_ids
from ..models.chat import encode, format_prompts
from ..models.generate import length_sorted_batches
from .hooks import ablate_direction, hook_outputs


@dataclass
class RefusalDirections:
    directions: torch.Tensor  # [L, d] unit vectors
    mean_harmful: torch.Tensor
    mean_harmless: torch.Tensor
    meta: dict = field(default_factory=dict)

    def unit(self, layer: int) -> torch.Tensor:
        return self.directions[layer]

    @property
    def selected_layer(self) -> int | None:
        return self.meta.get("selected_layer")

    def selected(self) -> torch.Tensor:
        layer = self.selected_layer
        if layer is None:
            raise UserError("no refusal direction has been selected (run selection first)")
        return self.directions[layer]

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"directions": self.directions.contiguous(),
                   "mean_harmful": self.mean_harmful.contiguous(),
                   "mean_harmless": self.mean_harmless.contiguous()}, str(tmp),
                  metadata={k: json.dumps(v) for k, v in self.meta.items()})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "RefusalDirections":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
                t = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise UserError(f"cannot read refusal directions from {path}: {type(e).__name__}") from None
        return cls(t["directions"], t["mean_harmful"], t["mean_harmless"], meta)


@torch.inference_mode()
def last_token_activations(lm, prompts: list[str], batch_size: int = 16,
                           system: str | None = None) -> torch.Tensor:
    """Block outputs at the last prompt position: [n, L, d] (float32, CPU)."""
    tok = lm.tokenizer
    texts = format_prompts(tok, prompts, system)
    out = torch.zeros((len(texts), lm.n_layers, lm.parts.hidden_size))
    from ..models.chat import token_lengths

    for idx in length_sorted_batches(token_lengths(tok, texts), batch_size):
        batch = encode(tok, [texts[i] for i in idx], device=lm.device)
        acts: list[torch.Tensor] = []

        def keep(h):
            acts.append(h[:, -1].float().cpu())  # left padding: last column = last prompt token
            return h

        with hook_outputs(list(lm.parts.blocks), keep):
            lm.model(**batch, use_cache=False)
        stacked = torch.stack(acts, 1)  # [b, L, d]
        for j, i in enumerate(idx):
            out[i] = stacked[j]
    return out


def compute_directions(lm, harmful: list[str], harmless: list[str], batch_size: int = 16,
                       system: str | None = None, meta: dict | None = None) -> RefusalDirections:
    if not harmful or not harmless:
        raise UserError("refusal directions need non-empty harmful and harmless prompt sets")
    mh = last_token_activations(lm, harmful, batch_size, system).mean(0)
    mb = last_token_activations(lm, harmless, batch_size, system).mean(0)
    r = mh - mb
    unit = r / r.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return RefusalDirections(unit, mh, mb, dict(meta or {}, n_harmful=len(harmful),
                                                 n_harmless=len(harmless),
                                                 position="last prompt token"))


@torch.inference_mode()
def _next_token_logp(lm, prompts: list[str], batch_size: int, system: str | None) -> torch.Tensor:
    tok = lm.tokenizer
    texts = format_prompts(tok, prompts, system)
    from ..models.chat import token_lengths

    out = [None] * len(texts)
    for idx in length_sorted_batches(token_lengths(tok, texts), batch_size):
        batch = encode(tok, [texts[i] for i in idx], device=lm.device)
        lp = torch.log_softmax(lm.model(**batch, use_cache=False).logits[:, -1].float(), -1).cpu()
        for j, i in enumerate(idx):
            out[i] = lp[j]
    return torch.stack(out, 0)  # [n, V]


def refusal_score_from_logp(logp: torch.Tensor, ids: list[int]) -> torch.Tensor:
    lp_r = torch.logsumexp(logp[:, ids], dim=-1)
    return lp_r - torch.log1p(-lp_r.exp().clamp(max=1 - 1e-7))


def select_direction(lm, dirs: RefusalDirections, harmful_val: list[str], harmless_val: list[str],
                     layers: list[int] | None = None, kl_max: float = 0.1, max_depth: float = 0.8,
                     batch_size: int = 16, system: str | None = None) -> RefusalDirections:
    """Score each candidate layer's direction by ablating it everywhere; record and select."""
    ids = refusal_token_ids(lm.tokenizer)
    L = lm.n_layers
    layers = list(range(L)) if layers is None else layers
    base_h = refusal_score_from_logp(_next_token_logp(lm, harmful_val, batch_size, system), ids)
    base_b = _next_token_logp(lm, harmless_val, batch_size, system)
    scores = {}
    for layer in layers:
        with ablate_direction(lm.parts, dirs.unit(layer)):
            s = refusal_score_from_logp(_next_token_logp(lm, harmful_val, batch_size, system), ids)
            lb = _next_token_logp(lm, harmless_val, batch_size, system)
        kl = (base_b.exp() * (base_b - lb)).sum(-1).mean().item()
        scores[layer] = {"refusal_score": s.mean().item(), "kl_harmless": kl}
    dirs.meta.update(selection={str(k): v for k, v in scores.items()},
                     baseline_refusal_score=base_h.mean().item(),
                     n_harmful_val=len(harmful_val), n_harmless_val=len(harmless_val))
    return rank_directions(dirs, kl_max, max_depth)


def rank_directions(dirs: RefusalDirections, kl_max: float = 0.1,
                    max_depth: float = 0.8) -> RefusalDirections:
    """Rank the scored layers (``meta["selection"]``, from :func:`select_direction`) by the
    selection rule — lowest refusal score among layers whose harmless KL is at most ``kl_max``
    and that lie in the first ``max_depth`` of the model (every layer when none passes) — and
    select the first. The scores do not depend on the guards, so one scoring pass serves any."""
    scores = {int(k): v for k, v in dirs.meta["selection"].items()}
    L = dirs.directions.shape[0]
    layers = sorted(scores)
    ok = [l for l in layers if scores[l]["kl_harmless"] <= kl_max and l <= max_depth * L]
    pool = ok or layers
    ranked = sorted(pool, key=lambda l: scores[l]["refusal_score"])
    dirs.meta.update(ranked_layers=ranked, selected_layer=ranked[0],
                     selection_rule=f"min refusal score s.t. KL <= {kl_max}, layer <= {max_depth}*L"
                     + ("" if ok else " (no layer passed the guards: unconstrained)"))
    return dirs
