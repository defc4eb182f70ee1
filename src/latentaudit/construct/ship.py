"""The zoo as shipped files: our own builds' LoRA adapters and cards, assembled in seconds.

``construct`` builds a zoo model from its recipe: minutes to tens of minutes on a CPU. For the
embedded SmolLM2-135M-Instruct the package ships what our builds produced, under
``latentaudit/zoo/<source>/<recipe>/``: each trained recipe's LoRA adapter (``safe``,
``hardened``; float16) and every recipe's card (``latentaudit_recipe.json``: recipe and
hyper-parameters, source, held-out evaluation). :func:`assemble` rebuilds the zoo folder from
them — the adapter merged into its source, or, for the transform recipes (``dissociated``,
``abliterated``), the recipe itself run (deterministic) — and writes the folder ``construct``
writes, its card marked ``shipped`` with where its figures came from.

The shipped files are a cache of our build with provenance, never a substitute for the recipe:
``construct`` still builds everything from scratch, and :func:`export` measures, when the files
are made, how far the assembled weights lie from the build's and what the assembled model's card
figures are.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..errors import UserError

SHIPPED = Path(__file__).resolve().parents[1] / "zoo"
ADAPTER_FILE = "adapter.safetensors"
CARD_FILE = "latentaudit_recipe.json"


def save_adapter(tensors: dict[str, torch.Tensor], lora: dict, path: Path,
                 dtype: torch.dtype | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: (v.to(dtype) if dtype else v).contiguous() for k, v in tensors.items()},
              str(path), metadata={"r": str(lora["r"]), "alpha": str(lora["alpha"]),
                                   "targets": ",".join(lora["targets"])})


def load_adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    try:
        lora = {"r": int(meta["r"]), "alpha": float(meta["alpha"]),
                "targets": meta["targets"].split(",")}
    except (KeyError, ValueError):
        raise UserError(f"{path}: not a latentaudit adapter (no r, alpha, targets)") from None
    return tensors, lora


def merge_adapter(lm, tensors: dict[str, torch.Tensor], lora: dict) -> None:
    """Merge a LoRA adapter into ``lm`` in place, exactly as ``train_terms`` merges its own."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    cfg = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                     target_modules=lora["targets"], task_type="CAUSAL_LM")
    model = get_peft_model(lm.model, cfg)
    dtype = lm.dtype
    res = set_peft_model_state_dict(model, {k: v.to(dtype) for k, v in tensors.items()})
    if getattr(res, "unexpected_keys", None):
        raise UserError(f"the adapter does not fit this model ({len(res.unexpected_keys)} "
                        "unknown tensors)")
    merged = model.merge_and_unload()
    merged.eval()
    for p in merged.parameters():
        p.requires_grad_(False)
    lm.set_model(merged)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shipped_dir(recipe: str, source: str) -> Path | None:
    """The shipped files of ``recipe`` built from the embedded ``source`` (``embedded:NAME``),
    or None."""
    if not source.startswith("embedded:"):
        return None
    d = SHIPPED / source.split(":", 1)[1] / recipe
    return d if (d / CARD_FILE).exists() else None


def shipped_card(d: Path) -> dict:
    return json.loads((d / CARD_FILE).read_text())


def assemble(d: Path, source_lm, out: Path, env, recipe) -> dict:
    """Turn ``source_lm`` (loaded in float32) into the shipped model of ``d``: merge its adapter,
    or run ``recipe`` (a transform) on it. Returns the shipped card, marked ``shipped``; the
    caller saves the model (as construct does)."""
    card = shipped_card(d)
    adapter = d / ADAPTER_FILE
    if adapter.exists():
        tensors, lora = load_adapter(adapter)
        merge_adapter(source_lm, tensors, lora)
        details = card.get("details", {})
    else:
        details = recipe.build(source_lm, env)
    card["shipped"] = {
        "from_package": str(d), "adapter_sha256": file_sha256(adapter) if adapter.exists() else None,
        "note": "assembled from the files latentaudit ships (our own build's adapter and card): "
                "`evaluation` is the build's, measured before shipping; `export` recorded how far "
                "the assembled weights lie from it (`export` below)"}
    card["details"] = details
    return card


def export(built: Path, dest: Path, assembled: Path | None = None) -> dict:
    """Make the shipped files of the zoo folder ``built`` in ``dest``: its adapter in float16
    (when it has one) and its card. With ``assembled`` (the same model assembled from ``dest``),
    record the largest weight difference to the build."""
    from safetensors.torch import load_file

    card = json.loads((built / CARD_FILE).read_text())
    dest.mkdir(parents=True, exist_ok=True)
    if (built / ADAPTER_FILE).exists():
        tensors, lora = load_adapter(built / ADAPTER_FILE)
        save_adapter(tensors, lora, dest / ADAPTER_FILE, torch.float16)
    if assembled is not None:
        a = load_file(str(assembled / "model.safetensors"))
        b = load_file(str(built / "model.safetensors"))
        diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in b)
        card["export"] = {"max_abs_weight_diff": diff, "tensors": len(b)}
    (dest / CARD_FILE).write_text(json.dumps(card, indent=2, default=str))
    return card

