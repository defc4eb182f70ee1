"""Relative per-position L2 budgets: ‖δ_t‖₂ ≤ ε·‖h_t‖₂ with h_t the clean hidden state.

ε may be one number or one per prompt (shape [batch]); a budget of 0 means δ = 0 exactly.
"""

from __future__ import annotations

import torch


def radius(h_clean: torch.Tensor, eps: torch.Tensor | float, mask: torch.Tensor) -> torch.Tensor:
    """Per-position radius ε_b·‖h_{b,t}‖, zero outside ``mask``. Shapes: h [b, t, d] → [b, t, 1]."""
    r = h_clean.detach().float().norm(dim=-1) * _per_row(eps, h_clean)[:, None]  # [b, t]
    return (r * mask.float()).unsqueeze(-1)


def _per_row(eps: torch.Tensor | float, h: torch.Tensor) -> torch.Tensor:
    """ε as one float32 value per row of h [b, ...]."""
    eps_t = torch.as_tensor(eps, dtype=torch.float32, device=h.device)
    return eps_t.expand(h.shape[0]) if eps_t.dim() == 0 else eps_t


def project(delta: torch.Tensor, rad: torch.Tensor) -> torch.Tensor:
    """Project every δ_t onto the ball of radius rad_t (rad 0 → δ_t = 0). [b, t, d], [b, t, 1]."""
    norm = delta.float().norm(dim=-1, keepdim=True)
    scale = torch.where(norm > rad, rad / norm.clamp_min(1e-30), torch.ones_like(norm))
    return (delta.float() * scale).to(delta.dtype)


def sphere(shape: tuple[int, ...], generator: torch.Generator | None = None,
           device=None) -> torch.Tensor:
    """Uniform unit vectors on the sphere along the last axis."""
    g = torch.randn(shape, generator=generator, device=device)
    return g / g.norm(dim=-1, keepdim=True).clamp_min(1e-30)


class RelativeBudget:
    """‖δ_t‖ ≤ ε·‖h_t‖ (the default). Attacks work in u-coordinates, ‖u_t‖ ≤ √d, with
    δ = to_delta(u · scale): one step size means one fraction of every position's ball."""

    name = "relative"

    def scale(self, h: torch.Tensor, eps, mask: torch.Tensor) -> torch.Tensor:
        """[b, t, 1]: δ_t = to_delta(u_t · scale_t) with ‖u_t‖ ≤ √d fills the ball; 0 off mask."""
        return radius(h, eps, mask) / h.shape[-1] ** 0.5

    def to_delta(self, v: torch.Tensor, layer: int) -> torch.Tensor:
        return v

    def from_delta(self, v: torch.Tensor, layer: int) -> torch.Tensor:
        return v

    def surface(self, h: torch.Tensor, eps: float, u: torch.Tensor, layer: int,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """δ on the surface of every position's ball, along the u-coordinate unit vectors u
        (same shape as h), zero where ``mask`` is False: what noise and steer push with."""
        delta = eps * h.float().norm(dim=-1, keepdim=True) * u
        return delta if mask is None else delta * mask[..., None]

    def direction(self, v: torch.Tensor, layer: int) -> torch.Tensor:
        """The u-coordinate unit vectors whose pushes point along δ-space directions v."""
        return v

    def describe(self) -> dict:
        return {"name": self.name}


class WhitenedBudget(RelativeBudget):
    """‖Σ_l^{-1/2} δ_t‖ ≤ ε·√d (interventions/whiten.py): the same ball at every position, in
    the units of the clean stream's spread; the ball maps onto itself under any invertible
    linear reparametrisation of the stream."""

    name = "whitened"

    def __init__(self, whitening):
        self.whitening = whitening

    def scale(self, h, eps, mask):
        return (_per_row(eps, h)[:, None] * mask.float()).unsqueeze(-1)

    def surface(self, h, eps, u, layer, mask=None):
        delta = self.to_delta(eps * h.shape[-1] ** 0.5 * u, layer)
        return delta if mask is None else delta * mask[..., None]

    def direction(self, v, layer):
        w = self.from_delta(v, layer)
        return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-30)

    def to_delta(self, v, layer):  # v Σ^{1/2} (symmetric): Σ^{1/2} v per position
        s = self.whitening.roots(layer)[0].to(v.device, torch.float32)
        return (v.float() @ s).to(v.dtype)

    def from_delta(self, v, layer):
        s_inv = self.whitening.roots(layer)[1].to(v.device, torch.float32)
        return (v.float() @ s_inv).to(v.dtype)

    def describe(self):
        return {"name": self.name, "whitening": self.whitening.meta.get("digest")}
