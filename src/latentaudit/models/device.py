"""Where and in which dtype a model runs: ``--device`` and ``--dtype`` resolved."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UserError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def auto_dtype(device: str) -> str:
    """``--dtype auto``: bfloat16 where the audit runs on a CUDA device that has it (half the
    memory, the tensor cores' type), float32 elsewhere (CPU matmuls gain nothing from it)."""
    name = (device or "auto").lower()
    if name in ("cpu", "mps") or not torch.cuda.is_available():
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"


def resolve_dtype(name: str, device: str | None = "auto") -> torch.dtype:
    key = (name or "float32").lower()
    if key == "auto":
        key = auto_dtype(device or "auto")
    if key not in DTYPES:
        raise UserError(f"unknown dtype '{name}' (choose from auto, float32, bfloat16, float16)")
    return DTYPES[key]


def resolve_device(name: str | None) -> tuple[str | None, Any]:
    """Return (device to move to, device_map for from_pretrained)."""
    name = (name or "auto").lower()
    if name == "auto":
        return ("cuda" if torch.cuda.is_available() else "cpu"), None
    if name in ("sharded", "device_map:auto"):
        if not torch.cuda.is_available():
            return "cpu", None
        return None, "auto"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("device 'mps' requested but MPS is not available")
    if name == "cpu" or name.startswith("cuda") or name == "mps":
        return name, None
    raise UserError(f"unknown device '{name}' (choose from auto, cpu, cuda, cuda:N, mps, sharded)")
