"""One loader for every model source.

A model spec is one of:

- ``embedded:smollm2-135m`` — the embedded SmolLM2-135M-Instruct (see :mod:`.embedded`);
- ``tiny:<family>`` — a tiny random model built offline from a config (tests, quick checks);
- a path to a ``.gguf`` file — dequantised once and cached as safetensors;
- a local checkpoint directory (safetensors);
- a Hugging Face hub id ``owner/name`` (downloads only when the user names one; ``@revision``
  may follow the id).

A folder (or a hub model's locally cached copy) is checked before anything loads: pickle
weights without safetensors need ``allow_pickle`` and a model's own code (``auto_map``, ``*.py``)
needs ``trust_remote_code`` (unpickling and that code can both run anything). A hub id is read
from the local cache when it is there; otherwise one short connection probe comes first, so
that an offline machine gets one line at once instead of a minute of retries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..files import staged_dir
from .device import resolve_device, resolve_dtype
from .embedded import EMBEDDED, cache_root, file_sha256_cached, find_embedded_gguf

log = logging.getLogger(__name__)

# "owner/name" as the hub spells ids; anything else that does not exist is a missing path
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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


# weights torch.load would unpickle; any of them beside a .safetensors file is never read
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class ModelSource:
    """Where ``from_pretrained`` reads a model from, once :func:`model_source` has checked it."""

    path: str  # a folder (a hub model's cached snapshot included), or a hub id to download
    revision: str | None  # the hub revision asked for
    local: bool  # local_files_only
    trust_remote_code: bool
    use_safetensors: bool | None  # None: transformers' own order (safetensors, then pickle)
    hub_id: str | None = None
    commit: str | None = None  # the cached snapshot's commit

    def common(self) -> dict[str, Any]:
        """Keyword arguments of every ``from_pretrained`` (config, tokenizer, weights)."""
        return {"revision": self.revision if self.path == self.hub_id else None,
                "local_files_only": self.local, "trust_remote_code": self.trust_remote_code}

    def weights(self) -> dict[str, Any]:
        """The extra keyword arguments of the weights' ``from_pretrained``."""
        return {} if self.use_safetensors is None else {"use_safetensors": self.use_safetensors}


def check_folder(folder: Path, label: str, allow_pickle: bool, trust_remote_code: bool) -> bool | None:
    """Refuse (UserError, one line naming ``label``) a folder with its own code unless
    ``trust_remote_code``, or with pickle weights and no safetensors unless ``allow_pickle``:
    both run arbitrary code on load. Returns ``use_safetensors`` for the weights (None: no
    weight file seen, transformers says what is missing)."""
    names = sorted(f.name for f in folder.iterdir() if f.is_file())
    code = _own_code(folder, names)
    if code and not trust_remote_code:
        raise UserError(f"{label} ships its own code ({code}): loading it would run that code; "
                        "pass --trust-remote-code if you trust its source")
    if any(n.endswith(".safetensors") for n in names):
        return True
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if not pickles:
        return None
    if not allow_pickle:
        more = f" and {len(pickles) - 1} more" if len(pickles) > 1 else ""
        raise UserError(f"{label} has pickle weights ({pickles[0]}{more}) and no safetensors: "
                        "unpickling can run arbitrary code; convert them to safetensors, or pass "
                        "--allow-pickle if you trust their source")
    return False


def _own_code(folder: Path, names: list[str]) -> str | None:
    """What makes transformers import code from the folder (auto_map, *.py), or None."""
    for name in ("config.json", "tokenizer_config.json"):
        if name in names:
            try:
                cfg = json.loads((folder / name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # a broken file: transformers' own error says so at load
            if isinstance(cfg, dict) and cfg.get("auto_map"):
                return f"auto_map in {name}"
    py = [n for n in names if n.endswith(".py")]
    return (py[0] + (f" and {len(py) - 1} more .py files" if len(py) > 1 else "")) if py else None


def hub_snapshot(hub_id: str, revision: str | None) -> Path | None:
    """The local Hugging Face cache's folder of ``hub_id`` at ``revision`` (a branch, tag or
    commit; default main) when it holds config.json and a weight file; otherwise None. Reads
    the cache only, never the network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cfg = try_to_load_from_cache(hub_id, "config.json", revision=revision)
    except Exception:  # an id or revision the hub library rejects: not cached
        return None
    if not isinstance(cfg, str):
        return None
    snap = Path(cfg).parent
    weights = (".safetensors",) + PICKLE_SUFFIXES
    return snap if any(f.name.endswith(weights) and f.is_file() for f in snap.iterdir()) else None


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, now or at import."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or any(
        os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_unreachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the hub's endpoint (huggingface_hub.constants.ENDPOINT, or the proxy the
    environment puts before it) accepts a TCP connection within ``timeout`` seconds; otherwise
    the reason in a few words. A thread bounds name resolution too, which sockets do not."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    proxy = getproxies().get(url.scheme)
    if proxy and not proxy_bypass(host):
        purl = urlsplit(proxy if "://" in proxy else "http://" + proxy)
        host, port = purl.hostname or host, purl.port or 80
    result: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(e.strerror or str(e) or type(e).__name__)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return result[0] if result else f"no answer in {timeout:g} s"


def model_source(target: str, who: str = "", allow_pickle: bool = False,
                 trust_remote_code: bool = False, revision: str | None = None,
                 use_cache: bool = True) -> ModelSource:
    """Where ``target`` (a model folder, or a hub id ``owner/name[@revision]``) loads from, checked
    by :func:`check_folder` (a hub model: its cached copy, when there is one). Returns a
    ModelSource; UserError (prefixed by ``who``) for a missing path, a refused folder, or a hub
    model that is not cached while the hub is offline or cannot be reached."""
    p = Path(target).expanduser()
    if p.exists():
        if not (p.is_dir() and _is_checkpoint_dir(p)):
            raise UserError(f"{who}{target} is not a model folder (no config.json)")
        safe = check_folder(p, f"{who}model folder {target}", allow_pickle, trust_remote_code)
        return ModelSource(str(p), None, True, trust_remote_code, safe)
    hub_id, _, rev = target.partition("@")
    if not _HUB_ID.match(hub_id):
        raise UserError(f"{who}model path not found: {target}")
    rev = rev or revision
    snap = hub_snapshot(hub_id, rev) if use_cache else None
    if snap is not None:
        safe = check_folder(snap, f"{who}hub model '{hub_id}' (cached in {snap})", allow_pickle,
                            trust_remote_code)
        return ModelSource(str(snap), rev, True, trust_remote_code, safe, hub_id, snap.name)
    what = f"{who}cannot load hub model '{hub_id}'"
    if hub_offline():
        raise UserError(f"{what}: HF_HUB_OFFLINE is set and the model is not (completely) in the "
                        "local cache: download it elsewhere and pass its folder")
    why = hub_unreachable()
    if why is not None:
        from urllib.parse import urlsplit

        from huggingface_hub import constants

        raise UserError(f"{what}: cannot reach {urlsplit(constants.ENDPOINT).netloc} ({why}) and "
                        "the model is not in the local cache: download it elsewhere and pass its "
                        "folder, or set HF_HUB_OFFLINE=1 to use a filled local cache")
    # downloaded files are not listed before they are read: safetensors only, unless allowed
    return ModelSource(hub_id, rev, False, trust_remote_code, None if allow_pickle else True, hub_id)


def _from_pretrained(src: ModelSource, extra: dict[str, Any]) -> tuple[Any, Any]:
    """(model, tokenizer) read from a checked source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = src.common()
    model = AutoModelForCausalLM.from_pretrained(src.path, **kw, **src.weights(), **extra)
    return model, AutoTokenizer.from_pretrained(src.path, **kw)


def _hub_failure(src: ModelSource, e: Exception) -> UserError:
    what = f"cannot load hub model '{src.hub_id}'"
    if src.use_safetensors and not src.local and "safetensors" in str(e):
        what += (" (no safetensors weights? pickle weights need --allow-pickle: unpickling can "
                 "run arbitrary code)")
    else:
        what += " (not a causal LM?)"
    return UserError(f"{what}: {type(e).__name__}: {_first_line(e)}")


def load_model(
    spec: str,
    device: str | None = "auto",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    revision: str | None = None,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from any supported source (returns a LoadedModel);
    UserError for a source that is missing, unreachable, or refused by :func:`check_folder`."""
    torch_dtype = resolve_dtype(dtype, device)
    dev, device_map = resolve_device(device)
    info: dict[str, Any] = {"spec": spec, "dtype": str(torch_dtype).replace("torch.", ""),
                            "device": device or "auto", "revision": revision}

    if spec.startswith("tiny:"):
        from .tiny import FAMILIES, tiny_model, tiny_tokenizer

        family = spec.split(":", 1)[1] or "llama"
        if family not in FAMILIES:
            raise UserError(f"unknown tiny model '{spec}' (families: {', '.join(FAMILIES)})")
        model = tiny_model(family)
        info.update(source="tiny", family=family,
                    attn_implementation=model.config._attn_implementation)
        return LoadedModel(_finish(model, dev, None, torch_dtype), tiny_tokenizer(), spec, info)

    if spec.startswith("embedded:"):
        alias = spec.split(":", 1)[1]
        gguf = find_embedded_gguf(alias)
        info.update(source="embedded", gguf=str(gguf), doc=EMBEDDED[alias].doc)
        src = ModelSource(str(_cached_gguf(gguf, info)), None, True, False, True)
    elif spec.endswith(".gguf"):
        gguf = Path(spec).expanduser()
        _check_gguf(gguf)
        info.update(source="gguf", gguf=str(gguf.resolve()))
        src = ModelSource(str(_cached_gguf(gguf, info)), None, True, False, True)
    else:
        src = model_source(spec, "", allow_pickle, trust_remote_code, revision)
        if src.hub_id is None:
            info.update(source="local", path=str(Path(src.path).resolve()))
        else:
            spec = src.hub_id
            info.update(source="hub", hub_id=src.hub_id, revision=src.revision)
    path = Path(src.path) if src.hub_id is None else None

    extra: dict[str, Any] = dict(dtype=torch_dtype)
    if device_map is not None:
        extra["device_map"] = device_map
    try:
        model, tok = _from_pretrained(src, extra)
    except UserError:
        raise
    except Exception as e:
        if src.hub_id is None:
            raise UserError(f"cannot load model from {src.path}: {type(e).__name__}: "
                            f"{_first_line(e)}") from None
        if not src.local:
            raise _hub_failure(src, e) from None
        # the cached copy is incomplete (a shard or the tokenizer missing): ask the hub
        src = model_source(src.hub_id, "", allow_pickle, trust_remote_code, src.revision,
                           use_cache=False)
        try:
            model, tok = _from_pretrained(src, extra)
        except Exception as e2:
            raise _hub_failure(src, e2) from None
    if src.hub_id is not None:
        info["commit"] = getattr(model.config, "_commit_hash", None) or src.commit
        info["cached"] = src.local
    if path is not None:
        info["fingerprint"] = dir_fingerprint(Path(path))
        note = precision_note(Path(path), torch_dtype)
        if note:
            info["precision_warning"] = note
            warnings.warn(note, stacklevel=2)
    info["model_type"] = model.config.model_type
    # transformers' default (sdpa where the architecture has it) is kept: hooks see block outputs
    info["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
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
