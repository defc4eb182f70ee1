"""What a worker process keeps between units: the model it last loaded."""

from __future__ import annotations

from typing import Any


def held_model(held: dict[tuple, Any], cfg) -> Any:
    """The model of ``cfg``, loaded once and kept in ``held`` for the next unit of the same
    model; another model replaces it (one model in memory per worker)."""
    from ..models.loader import load_model
    from ..models.memory import free_memory

    key = (cfg.model, cfg.device, cfg.dtype, cfg.trust_remote_code, cfg.allow_pickle)
    if key not in held:
        held.clear()
        free_memory()
        held[key] = load_model(cfg.model, cfg.device, cfg.dtype, cfg.trust_remote_code,
                               allow_pickle=cfg.allow_pickle)
    return held[key]

