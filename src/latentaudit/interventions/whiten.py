"""The whitened budget: a push measured in the units of the clean stream's own spread.

    ‖Σ_l^{-1/2} δ_t‖₂ ≤ ε·√d        (Σ_l the clean residual covariance at block l's output)

Σ_l is estimated on harmless prompts at the positions the audit may push (the position rule's,
sinks excluded), centred, with Ledoit–Wolf shrinkage toward a scaled identity (or a fixed
weight λ: ``latent.whiten_shrinkage``). Since
E‖Σ^{-1/2}(h − μ)‖² = d, ε is a fraction of a typical state's spread, as the relative budget's
ε is a fraction of ‖h_t‖.

Why: the relative budget ‖δ_t‖ ≤ ε‖h_t‖ depends on the basis of the residual stream. A model
whose writers put a subspace k× quieter into the stream and whose readers read it k× louder
computes the same function, yet a push along that subspace acts k× harder — LVS changes under
a reparametrisation (``construct rescaled``). Under any invertible linear map h' = Ph of the
stream, Σ' = PΣPᵀ and ‖Σ'^{-1/2}Pδ‖ = ‖Σ^{-1/2}δ‖: the feasible pushes map onto each other, and
the attack (run in whitened coordinates, where steps and projections are rotation-equivariant)
finds the same pushes. Only the shrinkage target breaks this, by its weight λ (recorded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models.chat import format_prompts, has_chat_template
from ..models.generate import length_sorted_batches
from .hooks import hook_outputs
from .positions import position_mask


@dataclass
class Whitening:
    """Per layer: the mean and the shrunk covariance of the clean stream, and the symmetric
    square root of the covariance and of its inverse."""

    mean: dict[int, torch.Tensor]
    cov: dict[int, torch.Tensor]
    meta: dict = field(default_factory=dict)
    _roots: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def roots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ^{1/2}, Σ^{-1/2}) of ``layer``, float32 [d, d]."""
        if layer not in self._roots:
            vals, vecs = torch.linalg.eigh(self.cov[layer].double())
            vals = vals.clamp_min(vals.max() * 1e-12)
            s = (vecs * vals.sqrt()) @ vecs.T
            s_inv = (vecs / vals.sqrt()) @ vecs.T
            self._roots[layer] = (s.float(), s_inv.float())
        return self._roots[layer]

    def save(self, path: Path) -> Path:
        import json

        from safetensors.torch import save_file

        tensors = {f"mean.{l}": m.contiguous() for l, m in self.mean.items()}
        tensors.update({f"cov.{l}": c.contiguous() for l, c in self.cov.items()})
        tmp = path.with_name(f".{path.name}.tmp")  # whole or absent: a killed run leaves no half
        save_file(tensors, str(tmp), metadata={"meta": json.dumps(self.meta)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> "Whitening":
        import json

        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["meta"])
            t = {k: f.get_tensor(k) for k in f.keys()}
        mean = {int(k.split(".")[1]): v for k, v in t.items() if k.startswith("mean.")}
        cov = {int(k.split(".")[1]): v for k, v in t.items() if k.startswith("cov.")}
        return cls(mean, cov, meta)


def ledoit_wolf(x: torch.Tensor, shrinkage: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(mean, shrunk covariance, λ) of samples x [n, d]: Σ̂ = (1 − λ)S + λ·tr(S)/d·I with the
    Ledoit–Wolf (2004) estimate of λ (S the sample covariance of the centred samples), or
    λ = ``shrinkage`` when given (0: the sample covariance, exactly basis-free)."""
    x = x.double()
    n, d = x.shape
    mu = x.mean(0)
    xc = x - mu
    s = xc.T @ xc / n
    m = torch.trace(s) / d
    if shrinkage is not None:
        lam = float(shrinkage)
    else:
        d2 = ((s - m * torch.eye(d, dtype=s.dtype)) ** 2).sum()
        b2 = ((xc.pow(2).sum(1) ** 2).sum() - n * (s ** 2).sum()) / n ** 2
        lam = float((torch.minimum(b2, d2) / d2).clamp(0, 1)) if d2 > 0 else 1.0
    cov = (1 - lam) * s + lam * m * torch.eye(d, dtype=s.dtype)
    return mu.float(), cov.float(), lam


@torch.inference_mode()
def estimate_whitening(lm, texts: list[str], layers: list[int], positions: str = "prompt",
                       sink_factor: float | None = 10.0, system: str | None = None,
                       batch_size: int = 16, meta: dict | None = None,
                       shrinkage: float | None = None) -> Whitening:
    """Σ_l and μ_l of the clean block outputs at ``layers`` over the chat-formatted ``texts``,
    at the positions the audit may push (``positions``/``sink_factor``, as the attack's)."""
    from .context import pad_left

    tok = lm.tokenizer
    ids = tok(format_prompts(tok, texts, system),
              add_special_tokens=not has_chat_template(tok))["input_ids"]
    blocks = [lm.parts.blocks[l] for l in layers]
    samples: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    for idx in length_sorted_batches([len(i) for i in ids], batch_size):
        inp, mask, pos = pad_left([ids[i] for i in idx], tok.pad_token_id, lm.device)
        outs: list[torch.Tensor] = []
        with hook_outputs(blocks, lambda h: outs.append(h.detach()) or h):
            lm.model(input_ids=inp, attention_mask=mask, position_ids=pos, use_cache=False)
        for l, h in zip(layers, outs):
            keep = position_mask(h, mask, positions, sink_factor)
            samples[l].append(h[keep].float().cpu())
    mean, cov, lams, n = {}, {}, {}, 0
    for l in layers:
        x = torch.cat(samples[l], 0)
        n = x.shape[0]
        mean[l], cov[l], lams[l] = ledoit_wolf(x, shrinkage)
    return Whitening(mean, cov, {**(meta or {}), "tokens": n, "prompts": len(texts),
                                 "shrinkage": {str(l): lams[l] for l in layers}})
