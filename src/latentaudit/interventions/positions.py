"""Which positions an intervention touches.

Modes (recorded with every result):

- ``prompt`` (default): every real prompt token except the first token and any other
  attention-sink position — a position whose clean hidden-state norm exceeds ``sink_factor``
  times the median norm of that prompt's positions. On SmolLM2 the first token's norm reaches
  ~24,700 against a median of ~170 from layer 15 on; a per-token relative budget there is a push
  100× larger than anywhere else, and it alone made random noise "succeed".
- ``last``: the final prompt token only.
- ``all``: prompt positions as in ``prompt`` plus every generated token (noise, steer, ablate).

Padding positions are never touched.
"""

from __future__ import annotations

import torch

POSITION_MODES = ("prompt", "last", "all")
DEFAULT_SINK_FACTOR = 10.0


def position_mask(
    h: torch.Tensor,  # [batch, seq, d] clean hidden states at the site
    attention_mask: torch.Tensor,  # [batch, seq] 1 = real token (left padding)
    mode: str = "prompt",
    sink_factor: float | None = DEFAULT_SINK_FACTOR,
) -> torch.Tensor:
    """Boolean [batch, seq] mask of the prompt positions to perturb."""
    real = attention_mask.bool()
    if mode == "last":
        mask = torch.zeros_like(real)
        mask[:, -1] = real[:, -1]  # left padding: the last column is every row's last token
        return mask
    if mode not in ("prompt", "all"):
        raise ValueError(f"unknown position mode {mode!r}")
    first = real & (real.long().cumsum(-1) == 1)  # each row's first real token
    mask = real & ~first
    if sink_factor is not None:
        norms = h.detach().float().norm(dim=-1)  # [batch, seq]
        masked = norms.masked_fill(~mask, float("nan"))
        median = masked.nanmedian(dim=-1, keepdim=True).values
        mask = mask & ~(norms > sink_factor * median)
    return mask


def describe_positions(mode: str, sink_factor: float | None) -> dict:
    return {"mode": mode, "exclude_first_token": mode != "last",
            "sink_factor": sink_factor if mode != "last" else None}
