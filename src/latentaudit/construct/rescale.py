"""Rescaling a subspace of the residual stream: a refusal feature written quietly and read loudly.

With Q an orthonormal basis of the subspace (e.g. refusal directions) and k > 1, every module
that writes into the residual stream writes its Q-component k times smaller,
P = I − (1 − 1/k)QQᵀ, so the stream at every layer is h' = P h; every module that reads the
stream through a norm reads it through P⁻¹ = I + (k − 1)QQᵀ (the norm's per-channel scale folded
into its readers first, so that P⁻¹ acts on the normalised state). Clean behaviour is the
original model's up to the norm's RMS, which loses the shrunk component (exactly equal when h
has no component in Q). A push δ at any layer reaches the readers as P⁻¹δ: its Q-component is
amplified k times, while the audit's budget, relative to ‖h'‖ ≈ ‖h‖, is not. The model keeps
its behaviour and needs a k-times smaller push along Q — a dissociation whose size is known by
construction.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..models.arch import _get, residual_writers, writer_out_dim
from .abliterate import orthonormal_basis, untie_head
from .subspace import refusal_subspace

# families whose blocks read the residual stream only through plain RMSNorms (y = γ ⊙ h/rms(h))
# ahead of these linear layers, and write into it directly (no post-norms)
_READERS = {fam: (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                  ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
            for fam in ("llama", "mistral", "qwen2", "qwen3", "smollm3")}


def _fold_and_amplify(norm, readers, Q: torch.Tensor, k: float) -> None:
    """W ← W diag(γ) (I + (k − 1)QQᵀ) for every reader of ``norm``; γ ← 1."""
    g = norm.weight.detach().clone()
    for w in readers:
        W = w.weight
        W.mul_(g.to(W.dtype).unsqueeze(0))
        Qw = Q.to(W.device, W.dtype)
        W.add_((k - 1.0) * (W @ Qw) @ Qw.T)
    norm.weight.fill_(1.0)


@torch.no_grad()
def rescale_subspace(lm, directions: list[torch.Tensor], k: float) -> int:
    """Write the span of ``directions`` k times smaller and read it k times larger (module
    docstring). Returns the subspace's dimension."""
    if not k > 0:
        raise ValueError(f"k must be > 0 (got {k})")
    parts = lm.parts
    spec = _READERS.get(parts.family)
    if spec is None:
        raise UserError(f"rescaling the residual stream is implemented for {', '.join(sorted(_READERS))} "
                        f"(pre-RMSNorm blocks), not {parts.family}")
    final = parts.final_norm
    if final is None or parts.lm_head is None or getattr(final, "bias", None) is not None:
        raise UserError("rescaling needs the final RMSNorm and the output head")
    Q = orthonormal_basis(directions).to(parts.embed.weight.device)  # [d, m]
    untie_head(lm)
    shrink = 1.0 - 1.0 / k
    E = parts.embed.weight
    Qe = Q.to(E.dtype)
    E.sub_(shrink * (E @ Qe) @ Qe.T)
    for layer in range(parts.n_layers):
        block = parts.blocks[layer]
        for w in residual_writers(parts, layer):
            Qw = Q.to(w.weight.device, w.weight.dtype)
            if writer_out_dim(w) != 0:
                raise UserError("rescaling expects Linear writers")
            w.weight.sub_(shrink * Qw @ (Qw.T @ w.weight))
            if getattr(w, "bias", None) is not None:
                w.bias.sub_(shrink * Qw @ (Qw.T @ w.bias))
        for norm_path, reader_paths in spec:
            norm = _get(block, norm_path)
            readers = [_get(block, p) for p in reader_paths]
            if norm is None or any(r is None for r in readers):
                raise UserError(f"block {layer} of {parts.family} lacks {norm_path} or its readers")
            _fold_and_amplify(norm, readers, Q, k)
    _fold_and_amplify(final, [parts.lm_head], Q, k)
    return int(Q.shape[1])


def rescale_refusal_subspace(lm, env, params: dict, cache: bool) -> dict:
    """Rescale ``lm``'s refusal subspace by ``params["rescale"]``: the refusal directions of
    its ``rescale_directions`` best-ranked layers (difference of means over ``rescale_n``
    prompts per set, ranked on the next ``rescale_selection_n``). Returns what was done."""
    k = float(params["rescale"])
    d, layers = refusal_subspace(lm, env, int(params["rescale_n"]),
                                 int(params["rescale_selection_n"]),
                                 int(params["rescale_directions"]), cache=cache)
    dim = rescale_subspace(lm, [d.unit(l) for l in layers], k)
    lm.set_model(lm.model)  # the head was untied: locate the parts again
    return {"k": k, "direction_layers": layers, "subspace_dim": dim,
            "selection": {a: b for a, b in d.meta.items() if a != "selection"}}
