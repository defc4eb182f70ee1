"""Shrink a subspace of the residual stream, keep behaviour: a dissociated model by construction.

For orthonormal directions Q (here the refusal directions) and a factor 0 < α ≤ 1, let
P = I − (1 − α)QQᵀ (the components along Q shrunk to α of their size) and P⁻¹ = I + (1/α − 1)QQᵀ.

- every module that writes into the residual stream (token embedding, attention output, MLP
  down projection) is multiplied by P: the residual stream becomes h' = P·h;
- every module that reads it through an RMSNorm (q/k/v, gate/up, the output head) gets the
  norm's gain g folded in and P⁻¹ applied to its input: W' = W·diag(g)·P⁻¹, and the norm's
  gain becomes 1. So W'·(h'/rms(h')) = W·diag(g)·h/rms(h')

which is the original computation up to rms(h') versus rms(h): ‖P h‖² = ‖h‖² − (1 − α²)‖Qᵀh‖²,
a small change where the subspace carries a small share of the norm (the card records the KL
to the source on harmless prompts). Behaviour stays; the geometry does not: a push δ at any
layer of the new model acts like P⁻¹δ on the source model, i.e. 1/α times larger along Q and
unchanged elsewhere. With budgets relative to ‖h‖ (DESIGN §1) the model is therefore at least
as fragile as its source in every direction, and 1/α times more fragile along the refusal
directions — known truth without training. What it tells an auditor: a relative-L2 latent
score depends on the basis the model happens to use, not only on its behaviour.

Exact for pre-norm RMSNorm families whose norm multiplies by its ``weight`` (llama-like); other
families raise a UserError.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..models.arch import residual_writers
from .abliterate import orthonormal_basis, untie_head

# family -> per block: (norm, the linears that read its output); then the final norm → head
_LLAMA_READERS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                  ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
_READERS = {fam: _LLAMA_READERS for fam in ("llama", "qwen2", "qwen3", "mistral", "smollm3")}


def _readers(parts, layer: int):
    block = parts.blocks[layer]
    for norm_path, lin_paths in _READERS[parts.family]:
        yield block.get_submodule(norm_path), [block.get_submodule(p) for p in lin_paths]


@torch.no_grad()
def rescale_subspace(lm, directions: list[torch.Tensor], alpha: float) -> int:
    """Shrink the span of ``directions`` in the residual stream to α of its size, folding the
    inverse into every reader (see the module doc). Returns the subspace's dimension."""
    parts = lm.parts
    if parts.family not in _READERS:
        raise UserError(f"rescaling the residual stream is implemented for {', '.join(sorted(_READERS))} "
                        f"(RMSNorm pre-norm blocks), not for {parts.family}")
    if not 0 < float(alpha) <= 1:
        raise UserError(f"the rescale factor must be in (0, 1], got {alpha}")
    Q = orthonormal_basis(directions)
    untie_head(lm)
    shrink, grow = 1.0 - float(alpha), 1.0 / float(alpha) - 1.0

    def fold(norm, linears):
        g = norm.weight.detach().float().clone()
        for lin in linears:
            W = lin.weight.float() * g  # W·diag(g): [out, d]
            for j in range(Q.shape[1]):
                q = Q[:, j].to(W.device)
                W = W + grow * (W @ q).unsqueeze(-1) * q  # W·P⁻¹
            lin.weight.copy_(W.to(lin.weight.dtype))
        norm.weight.fill_(1.0)

    for j in range(Q.shape[1]):  # writers: P·W (orthonormal q's: one pass each)
        q = Q[:, j]
        E = parts.embed.weight
        qe = q.to(E.device, E.dtype)
        E -= shrink * (E @ qe).unsqueeze(-1) * qe
        for layer in range(parts.n_layers):
            for w in residual_writers(parts, layer):
                qq = q.to(w.weight.device, w.weight.dtype)
                w.weight -= shrink * qq.unsqueeze(-1) * (qq @ w.weight).unsqueeze(0)
                if getattr(w, "bias", None) is not None:
                    w.bias -= shrink * (w.bias @ qq) * qq
    for layer in range(parts.n_layers):
        for norm, linears in _readers(parts, layer):
            fold(norm, linears)
    fold(parts.final_norm, [parts.lm_head])
    return int(Q.shape[1])
