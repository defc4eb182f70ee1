"""Relative per-position L2 budgets: ‖δ_t‖₂ ≤ ε·‖h_t‖₂ with h_t the clean hidden state.

ε may be one number or one per prompt (shape [batch]); a budget of 0 means δ = 0 exactly.
"""

from __future__ import annotations

import torch


def radius(h_clean: torch.Tensor, eps: torch.Tensor | float, mask: torch.Tensor) -> torch.Tensor:
    """Per-position radius ε_b·‖h_{b,t}‖, zero outside ``mask``. Shapes: h [b, t, d] → [b, t, 1]."""
    eps_t = torch.as_tensor(eps, dtype=torch.float32, device=h_clean.device)
    if eps_t.dim() == 0:
        eps_t = eps_t.expand(h_clean.shape[0])
    r = h_clean.detach().float().norm(dim=-1) * eps_t[:, None]  # [b, t]
    return (r * mask.float()).unsqueeze(-1)


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
