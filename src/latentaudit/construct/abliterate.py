"""Weight orthogonalisation against a refusal direction r̂ (an "abliterated" model).

Every module that writes into the residual stream — the token embedding and, per block, the
attention-output and MLP-down projections — gets r̂ projected out of its output space:
W ← (I − r̂r̂ᵀ)W for a Linear (weight [d_model, d_in]), W ← W(I − r̂r̂ᵀ) for GPT-2's Conv1D
(weight [d_in, d_model]), E ← E(I − r̂r̂ᵀ) for the embedding; biases likewise. The result equals
runtime directional ablation at those sites (``interventions.hooks.ablate_direction``). A head
tied to the embedding is untied first, so the output logits read the original vocabulary
matrix, as they do under runtime ablation.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..models.arch import residual_writers, writer_out_dim, writers_write_directly


def orthonormal_basis(directions: list[torch.Tensor]) -> torch.Tensor:
    """[d, k] orthonormal basis of the span of ``directions`` (left singular vectors with a
    non-negligible singular value: a direction dependent on the others adds nothing, wherever
    it sits in the list)."""
    D = torch.stack([r / r.norm() for r in directions], 1).double()
    U, S, _ = torch.linalg.svd(D, full_matrices=False)
    return U[:, S > 1e-6 * S[0]].float()


@torch.no_grad()
def orthogonalize_subspace(lm, directions: list[torch.Tensor]) -> int:
    """Project the span of several directions out of every residual writer. For orthonormal
    q_1..q_k, (I − q_1q_1ᵀ)…(I − q_kq_kᵀ) = I − QQᵀ, so one pass per basis vector removes the
    whole subspace. Returns its dimension."""
    Q = orthonormal_basis(directions)
    for j in range(Q.shape[1]):
        orthogonalize(lm, Q[:, j])
    return int(Q.shape[1])


def untie_head(lm) -> None:
    """Give an output head tied to the token embedding its own copy of the weights (and say so
    in the config), so that editing what the embedding writes leaves what the head reads."""
    parts = lm.parts
    head = parts.lm_head
    if head is not None and head.weight.data_ptr() == parts.embed.weight.data_ptr():
        head.weight = torch.nn.Parameter(parts.embed.weight.detach().clone(), requires_grad=False)
        lm.model.config.tie_word_embeddings = False
        if hasattr(lm.model.config, "get_text_config"):
            lm.model.config.get_text_config().tie_word_embeddings = False


@torch.no_grad()
def orthogonalize(lm, r_hat: torch.Tensor) -> None:
    parts = lm.parts
    if not writers_write_directly(parts.family):
        raise UserError(f"weight orthogonalisation is not exact for {parts.family} (its blocks "
                        "normalise what they write into the residual stream)")
    r = (r_hat / r_hat.norm()).to(parts.embed.weight.device, parts.embed.weight.dtype)
    untie_head(lm)
    E = parts.embed.weight
    E -= (E @ r).unsqueeze(-1) * r
    for layer in range(parts.n_layers):
        for w in residual_writers(parts, layer):
            rr = r.to(w.weight.device, w.weight.dtype)
            if writer_out_dim(w) == 0:  # Linear: [d_model, d_in]
                w.weight -= rr.unsqueeze(-1) * (rr @ w.weight).unsqueeze(0)
            else:  # Conv1D: [d_in, d_model]
                w.weight -= (w.weight @ rr).unsqueeze(-1) * rr
            if getattr(w, "bias", None) is not None:
                w.bias -= (w.bias @ rr) * rr
