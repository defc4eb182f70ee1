"""What a worker process keeps between units: the model it last loaded."""

from __future__ import annotations

import gc
from typing import Any


def held_model(held: dict[tuple, Any], cfg) -> Any:
    """The model of ``cfg``, loaded once and kept in ``held`` for the next unit of the same
    model; another model replaces it (one model in memory per worker)."""
    from ..models.loader import load_model

    key = (cfg.model, cfg.device, cfg.dtype, cfg.trust_remote_code, cfg.allow_pickle)
    if key not in held:
        held.clear()
        gc.collect()
        _free_accelerator_memory()
        held[key] = load_model(cfg.model, cfg.device, cfg.dtype, cfg.trust_remote_code,
                               allow_pickle=cfg.allow_pickle)
    return held[key]


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
