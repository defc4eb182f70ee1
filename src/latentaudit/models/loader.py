"""One loader for every model source.

A model spec is one of:

- ``embedded:smollm2-135m`` — the embedded SmolLM2-135M-Instruct (see :mod:`.embedded`);
- ``tiny:<family>`` — a tiny random model built offline from a config (tests, quick checks);
- a path to a ``.gguf`` file — dequantised once and cached as safetensors;
- a local checkpoint directory (safetensors);
- a Hugging Face hub id ``owner/name`` (downloads only when the user names one; ``@revision``
  may follow the id).

``trust_remote_code`` is off unless the caller asks for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..files import staged_dir
from .embedded import EMBEDDED, cache_root, file_sha256_cached, find_embedded_gguf

log = logging.getLogger(__name__)

# "owner/name" as the hub spells ids; anything else that does not exist is a missing path
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer, located parts and provenance."""

    model: Any
    tokenizer: Any
    spec: str
    info: dict = field(default_factory=dict)
    _parts: Any = None

    def set_model(self, model) -> None:
        """Swap in ``model`` (a merged or edited copy): its parts are located again on next use."""
        self.model = model
        self._parts = None

    @property
    def parts(self):
        if self._parts is None:
            from .arch import locate_parts

            self._parts = locate_parts(self.model)
        return self._parts

    @property
    def device(self) -> torch.device:
        return self.parts.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.parts.embed.weight.dtype

    @property
    def n_layers(self) -> int:
        return self.parts.n_layers


def resolve_dtype(name: str) -> torch.dtype:
    key = (name or "float32").lower()
    if key not in DTYPES:
        raise UserError(f"unknown dtype '{name}' (choose from float32, bfloat16, float16)")
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


def _finish(model, device, device_map, dtype) -> Any:
    if device_map is None and device is not None:
        model = model.to(device)
    model = model.to(dtype) if device_map is None else model
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _prepare_tokenizer(tok) -> Any:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "left"
    return tok


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path} is not a GGUF file (bad magic bytes)")


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise a GGUF with transformers and save a plain safetensors checkpoint.

    ``save_pretrained`` refuses models loaded from GGUF ("quantized with gguf and is not
    serializable"), so the state dict goes into a fresh model built from a plain config.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            src = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except UserError:
        raise
    except Exception as e:  # corrupt, truncated or unsupported architecture
        raise UserError(f"cannot load GGUF {gguf}: {type(e).__name__}: {e}") from None
    cfg_dict = src.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**{k: v for k, v in cfg_dict.items() if k != "model_type"},
                                  model_type=cfg_dict["model_type"])
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(src.state_dict(), strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"GGUF {gguf} did not map onto {config.model_type}: missing {missing[:3]}")
    with staged_dir(out_dir, replace=False) as tmp:  # another process may publish it first
        fresh.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "latentaudit_source.json").write_text(
            json.dumps({"gguf": str(gguf), "gguf_sha256": file_sha256_cached(gguf)}, indent=2))


def gguf_cache_dir(gguf: Path) -> tuple[Path, str]:
    sha = file_sha256_cached(gguf)
    return cache_root() / "models" / f"{gguf.stem}-{sha[:12]}", sha


def _is_checkpoint_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def load_model(
    spec: str,
    device: str | None = "auto",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from any supported source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    dev, device_map = resolve_device(device)
    info: dict[str, Any] = {"spec": spec, "dtype": str(torch_dtype).replace("torch.", ""),
                            "device": device or "auto", "revision": revision}

    if spec.startswith("tiny:"):
        from .tiny import FAMILIES, tiny_model, tiny_tokenizer

        family = spec.split(":", 1)[1] or "llama"
        if family not in FAMILIES:
            raise UserError(f"unknown tiny model '{spec}' (families: {', '.join(FAMILIES)})")
        model = tiny_model(family)
        info.update(source="tiny", family=family)
        return LoadedModel(_finish(model, dev, None, torch_dtype), tiny_tokenizer(), spec, info)

    if spec.startswith("embedded:"):
        alias = spec.split(":", 1)[1]
        gguf = find_embedded_gguf(alias)
        info.update(source="embedded", gguf=str(gguf), doc=EMBEDDED[alias].doc)
        path = _cached_gguf(gguf, info)
    elif spec.endswith(".gguf"):
        gguf = Path(spec).expanduser()
        _check_gguf(gguf)
        info.update(source="gguf", gguf=str(gguf.resolve()))
        path = _cached_gguf(gguf, info)
    else:
        p = Path(spec).expanduser()
        looks_like_hub_id = bool(_HUB_ID.match(spec.split("@", 1)[0]))
        if p.exists():
            if not _is_checkpoint_dir(p):
                raise UserError(f"{spec} is not a model checkpoint directory (no config.json)")
            path = p
            info.update(source="local", path=str(p.resolve()))
        elif not looks_like_hub_id:
            raise UserError(f"model path not found: {spec}")
        else:
            if "@" in spec:
                spec, revision = spec.split("@", 1)
                info["revision"] = revision
            path = None
            info.update(source="hub", hub_id=spec)

    kwargs: dict[str, Any] = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if device_map is not None:
        kwargs["device_map"] = device_map
    if path is not None:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **kwargs)
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                trust_remote_code=trust_remote_code)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot load model from {path}: {type(e).__name__}: {_first_line(e)}") from None
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(spec, revision=revision, **kwargs)
            tok = AutoTokenizer.from_pretrained(spec, revision=revision,
                                                trust_remote_code=trust_remote_code)
        except Exception as e:
            raise UserError(
                f"cannot load hub model '{spec}' (offline, or not a causal LM?): "
                f"{type(e).__name__}: {_first_line(e)}"
            ) from None
        info["commit"] = getattr(model.config, "_commit_hash", None)
    if path is not None:
        info["fingerprint"] = dir_fingerprint(Path(path))
        note = precision_note(Path(path), torch_dtype)
        if note:
            info["precision_warning"] = note
            warnings.warn(note, stacklevel=2)
    info["model_type"] = model.config.model_type
    lm = LoadedModel(_finish(model, dev, device_map, torch_dtype), _prepare_tokenizer(tok), spec, info)
    lm.parts  # locate blocks now: an unsupported architecture fails at load, not mid-run
    return lm


def precision_note(path: Path, dtype: torch.dtype) -> str | None:
    """A warning when a latentaudit zoo model whose refusal subspace was rescaled (``construct
    dissociated``'s default) is loaded below float32: its quieted component lies under 16-bit
    rounding, and the rescale reads that rounding K× louder (measured on SmolLM2, K 200, bf16:
    8 of 40 greedy answers equal float32's, against 27 of 40 for the unrescaled source)."""
    if dtype == torch.float32 or dtype == torch.float64:
        return None
    try:
        meta = json.loads((path / "latentaudit_recipe.json").read_text())
        k = float(meta.get("details", {}).get("rescale", {}).get("k", 1.0))
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    if k <= 1:
        return None
    return (f"{path.name}: its refusal subspace is written {k:g}x quieter (construct rescale); in "
            f"{str(dtype).replace('torch.', '')} the rounding is read {k:g}x louder and its "
            "behaviour drifts from float32's: audit it with --dtype float32")


def _cached_gguf(gguf: Path, info: dict) -> Path:
    out, sha = gguf_cache_dir(gguf)
    info["gguf_sha256"] = sha
    info["cache"] = str(out)
    if not _is_checkpoint_dir(out):
        log.info("dequantising %s once into %s", gguf, out)
        _convert_gguf(gguf, out)
        info["converted_now"] = True
    else:
        info["converted_now"] = False
    return out


def dir_fingerprint(path: Path) -> str:
    """Content fingerprint of a checkpoint folder: the names and full sha256 of every
    weight/config/tokenizer file. A fine-tune saved in place changes it even where the first
    bytes stay the same (a merged LoRA leaves the header and the embedding, which open
    model.safetensors, untouched). Each file's hash is memoised in the user cache under its
    path, size, inode and mtime, so a folder is read in full once (about 0.4 s per GB)."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and f.suffix in (".safetensors", ".json", ".bin", ".model"):
            h.update(f.name.encode() + b"\0" + file_sha256_cached(f).encode())
    return h.hexdigest()[:16]


def _first_line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else ""
