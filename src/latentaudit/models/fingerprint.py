"""What identifies a model's weights: the one rule behind store keys and cache file names."""

from __future__ import annotations

from pathlib import Path

_FOLDER_FIRST = ("fingerprint", "gguf_sha256", "commit")
_GGUF_FIRST = ("gguf_sha256", "fingerprint", "commit")


def fingerprint(lm, *, gguf_first: bool = False) -> str | None:
    """The identity of ``lm``'s weights, from what the loader recorded: the content fingerprint
    of the checkpoint folder it was read from, else its gguf file's sha256, else its hub commit.
    None when it has none (a tiny model is built in code: its spec is its identity).

    A model read from a gguf has two: the gguf's sha256 and the fingerprint of the folder it was
    converted into. ``gguf_first`` prefers the gguf's, which :func:`spec_fingerprint` knows
    without loading. The run store and the zoo's answers cache key on the folder, the tamper
    pairs cache on the gguf; both stay so that existing run folders and caches stay valid."""
    return info_fingerprint(getattr(lm, "info", None) or {}, gguf_first=gguf_first)


def info_fingerprint(info: dict, *, gguf_first: bool = False) -> str | None:
    """:func:`fingerprint` from a loader's ``info`` record (a model card's ``source_info``)."""
    for k in _GGUF_FIRST if gguf_first else _FOLDER_FIRST:
        if info.get(k):
            return str(info[k])
    return None


def spec_fingerprint(spec: str) -> str | None:
    """``fingerprint(load_model(spec), gguf_first=True)`` read from the files, without loading.
    None when only loading can tell (a hub model's commit) or there is none (a tiny model)."""
    from .embedded import EMBEDDED, file_sha256_cached, find_embedded_gguf
    from .loader import dir_fingerprint

    if spec.startswith("tiny:"):
        return None
    if spec.startswith("embedded:"):
        alias = spec.split(":", 1)[1]
        find_embedded_gguf(alias)  # installed, and matches its pinned hash
        return EMBEDDED[alias].sha256
    p = Path(spec).expanduser()
    if spec.endswith(".gguf") and p.is_file():
        return file_sha256_cached(p)
    if p.is_dir() and (p / "config.json").is_file():
        return dir_fingerprint(p)
    return None


def spec_folder_fingerprint(spec: str) -> tuple[bool, str | None]:
    """``(known, fingerprint(load_model(spec)))`` read from the files, without loading: the
    store key's identity (folder first). ``known`` is False when only loading can tell (a hub
    model's commit, a gguf not yet converted, a path that is not a model)."""
    from .embedded import EMBEDDED, find_embedded_gguf
    from .loader import _is_checkpoint_dir, dir_fingerprint, gguf_cache_dir

    if spec.startswith("tiny:"):
        return True, None
    if spec.startswith("embedded:") or spec.endswith(".gguf"):
        if spec.startswith("embedded:"):
            alias = spec.split(":", 1)[1]
            try:
                gguf = find_embedded_gguf(alias) if alias in EMBEDDED else None
            except Exception:  # not installed: loading says how to install it
                gguf = None
        else:
            gguf = Path(spec).expanduser()
        if gguf is None or not gguf.is_file():
            return False, None
        out, _ = gguf_cache_dir(gguf)
        return (True, dir_fingerprint(out)) if _is_checkpoint_dir(out) else (False, None)
    p = Path(spec).expanduser()
    if p.is_dir() and _is_checkpoint_dir(p):
        return True, dir_fingerprint(p)
    return False, None
