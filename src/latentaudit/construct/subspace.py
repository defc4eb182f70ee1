"""The refusal directions a zoo transform needs (``dissociated``'s rescale, ``abliterated``),
selected once per source model and cached under its weights' fingerprint."""

from __future__ import annotations

from ..data.sets import load_prompt_set


def refusal_subspace(lm, env, n: int, m: int, k: int, cache: bool = False,
                     kl_max: float = 0.1):
    """The model's refusal directions (difference of means over n built-in harmful and harmless
    train prompts) and the k best-ranked layers by the selection rule (ablation scored on the
    next m of each). ``cache``: ``lm`` holds the weights it was loaded with, so the directions
    are read from (or written to) the user cache under the model's fingerprint, n, m, the batch
    size, dtype and the prompt sets' sha256: a zoo whose `dissociated` and `abliterated` share a
    source scores the layers once; ``kl_max`` (the selection rule's KL guard) only re-ranks the
    cached scores."""
    import hashlib

    from ..interventions.directions import (RefusalDirections, compute_directions,
                                            rank_directions, select_direction)
    from ..models.embedded import cache_root
    from ..models.fingerprint import fingerprint

    hs, bs = load_prompt_set("builtin:harmful:train"), load_prompt_set("builtin:harmless:train")
    path = None
    if cache:
        fp = fingerprint(lm) or lm.info.get("spec")  # a tiny model's spec stands in
        key = hashlib.sha256(f"{fp}|{n}|{m}|{env.batch_size}|{lm.dtype}|"
                             f"{hs.sha256}|{bs.sha256}".encode()).hexdigest()[:16]
        path = cache_root() / "directions" / f"{key}.safetensors"
        if path.exists():
            try:
                d = rank_directions(RefusalDirections.load(path), kl_max)
                return d, d.meta["ranked_layers"][:k]
            except Exception:  # a damaged cache entry: select again and overwrite it
                pass
    harm, safe = hs.texts, bs.texts
    d = compute_directions(lm, harm[:n], safe[:n], env.batch_size)
    d = select_direction(lm, d, harm[n : n + m], safe[n : n + m], batch_size=env.batch_size,
                         kl_max=kl_max)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        d.save(path)
    return d, d.meta["ranked_layers"][:k]
