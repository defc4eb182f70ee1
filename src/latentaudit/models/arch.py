"""Locate the parts of a Hugging Face causal LM that latentaudit intervenes on.

Interventions are forward hooks on the *decoder blocks*; the intervention site after block ``l``
is the residual stream leaving it (``site_name(l)`` = ``"blocks.{l}.resid_post"``), which equals
``hidden_states[l + 1]`` of a forward with ``output_hidden_states=True`` for every block but the
last (for the last block transformers reports ``final_norm(block output)`` instead).

Blocks are found through the model's own structure, never by assuming one architecture:

1. a small table (:data:`_FAMILY_PATHS`) for families whose attribute paths are known;
2. otherwise a generic search: the largest ``nn.ModuleList`` whose length equals the config's
   number of layers, the embedding from ``get_input_embeddings()``, the head from
   ``get_output_embeddings()`` and the final norm as the norm module that is a sibling of the
   block list.

Block return type (transformers 5.x): decoder blocks of most families return a bare tensor,
some still return a tuple whose first element is the hidden state; hooks must accept both
(see ``tests/test_arch.py::test_block_output_type`` for the per-family record).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import UserError

__all__ = [
    "ModelParts",
    "locate_parts",
    "residual_writers",
    "writer_out_dim",
    "writers_write_directly",
    "site_name",
]


@dataclass
class ModelParts:
    """The pieces of a causal LM that interventions need."""

    family: str  # config.model_type
    blocks: nn.ModuleList  # decoder blocks in order, len == n_layers
    final_norm: nn.Module | None  # norm applied to the last block's output (None if absent)
    embed: nn.Embedding  # token embedding
    lm_head: nn.Module  # output projection to the vocabulary
    block_path: str  # dotted path of ``blocks`` inside the model passed in, e.g. "model.layers"
    n_layers: int
    hidden_size: int


# family -> (blocks, final norm, token embedding), relative to the *base* model (peft unwrapped).
# Only families whose paths differ from the llama-like default need an entry; anything else
# goes through the generic search, and a table entry that does not resolve falls back to it too.
_LLAMA_PATHS = ("model.layers", "model.norm", "model.embed_tokens")
_FAMILY_PATHS: dict[str, tuple[str, str, str]] = {
    "gpt2": ("transformer.h", "transformer.ln_f", "transformer.wte"),
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.final_layer_norm", "gpt_neox.embed_in"),
    "gptj": ("transformer.h", "transformer.ln_f", "transformer.wte"),
    "falcon": ("transformer.h", "transformer.ln_f", "transformer.word_embeddings"),
    "bloom": ("transformer.h", "transformer.ln_f", "transformer.word_embeddings"),
    "opt": ("model.decoder.layers", "model.decoder.final_layer_norm", "model.decoder.embed_tokens"),
    **{
        fam: _LLAMA_PATHS
        for fam in (
            "llama", "qwen2", "qwen3", "mistral", "mixtral", "gemma", "gemma2", "gemma3_text",
            "phi3", "olmo", "olmo2", "granite", "smollm3", "cohere",
        )
    },
}


def site_name(layer: int) -> str:
    """Stable name of the intervention site after decoder block ``layer``."""
    return f"blocks.{int(layer)}.resid_post"


def _unwrap(model: nn.Module) -> nn.Module:
    """The underlying transformers model of a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        try:
            base = get_base()
        except Exception:  # pragma: no cover - exotic wrappers
            base = None
        if isinstance(base, nn.Module):
            return base
    return model


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        return None
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            return get_text()
        except Exception:  # pragma: no cover
            return config
    return config


def _cfg_int(config, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None) if config is not None else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _path_of(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules(remove_duplicate=False):
        if module is target:
            return name
    return ""  # pragma: no cover - target always comes from model


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)) or "norm" in type(
        module
    ).__name__.lower()


def _find_blocks(base: nn.Module, n_layers: int | None) -> tuple[str, nn.ModuleList] | None:
    """The largest (by parameter count) ModuleList of length ``n_layers``."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in base.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if n_layers is not None and len(module) != n_layers:
            continue
        n_params = sum(p.numel() for p in module.parameters())
        if best is None or n_params > best[0]:
            best = (n_params, name, module)
    return None if best is None else (best[1], best[2])


def _find_final_norm(base: nn.Module, block_path: str) -> nn.Module | None:
    """The norm that is a sibling of the block list (preferring conventional names)."""
    parent_path = block_path.rpartition(".")[0]
    parent = base.get_submodule(parent_path) if parent_path else base
    norms = [(name, m) for name, m in parent.named_children() if _is_norm(m)]
    if not norms:
        return None
    for preferred in ("norm", "final_layernorm", "final_layer_norm", "ln_f", "final_norm"):
        for name, m in norms:
            if name == preferred:
                return m
    return norms[-1][1]


def locate_parts(model: nn.Module) -> ModelParts:
    """Find the decoder blocks, final norm, embedding and head of a causal LM.

    Works on transformers models and on peft wrappers of them. ``block_path`` is relative to the
    object passed in. Raises :class:`UserError` when no decoder block list can be found.
    """
    base = _unwrap(model)
    config = _text_config(base)
    family = str(getattr(config, "model_type", "") or type(base).__name__)
    n_cfg = _cfg_int(config, "num_hidden_layers", "n_layer", "num_layers", "n_layers")

    blocks = final_norm = embed = None
    entry = _FAMILY_PATHS.get(family)
    if entry is not None:
        b = _get(base, entry[0])
        if isinstance(b, nn.ModuleList) and (n_cfg is None or len(b) == n_cfg):
            blocks = b
            final_norm = _get(base, entry[1])
            embed = _get(base, entry[2])

    if blocks is None:
        found = _find_blocks(base, n_cfg)
        if found is None:
            want = f"{n_cfg} layers" if n_cfg is not None else "decoder layers"
            raise UserError(
                f"cannot locate the decoder blocks of {type(base).__name__} "
                f"(model_type {family!r}): no torch.nn.ModuleList with {want} found"
            )
        rel_path, blocks = found
        final_norm = _find_final_norm(base, rel_path)

    if embed is None or not isinstance(embed, nn.Embedding):
        get_in = getattr(base, "get_input_embeddings", None)
        embed = get_in() if callable(get_in) else None
    if not isinstance(embed, nn.Module):
        raise UserError(f"cannot locate the token embedding of {type(base).__name__}")

    lm_head = None
    get_out = getattr(base, "get_output_embeddings", None)
    if callable(get_out):
        lm_head = get_out()
    if lm_head is None:
        lm_head = getattr(base, "lm_head", None) or getattr(base, "embed_out", None)
    if lm_head is None:
        raise UserError(f"cannot locate the output head of {type(base).__name__}: not a causal LM?")

    hidden = _cfg_int(config, "hidden_size", "n_embd", "d_model")
    if hidden is None:
        hidden = int(getattr(embed, "embedding_dim", 0) or embed.weight.shape[-1])

    return ModelParts(
        family=family,
        blocks=blocks,
        final_norm=final_norm,
        embed=embed,
        lm_head=lm_head,
        block_path=_path_of(model, blocks),
        n_layers=len(blocks),
        hidden_size=int(hidden),
    )


# ---------------------------------------------------------------------------------------------
# Residual writers
#
# family -> paths (inside one decoder block) of the modules whose output is ADDED into the
# residual stream: the attention output projection and the MLP down projection.
_LLAMA_WRITERS = ("self_attn.o_proj", "mlp.down_proj")
_WRITERS: dict[str, tuple[str, ...]] = {
    **{
        fam: _LLAMA_WRITERS
        for fam in (
            "llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3",
            "olmo", "olmo2", "granite", "smollm3", "cohere",
        )
    },
    "gpt2": ("attn.c_proj", "mlp.c_proj"),  # transformers Conv1D, weight is (in, out)
    "gptj": ("attn.out_proj", "mlp.fc_out"),
    "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h"),
    "falcon": ("self_attention.dense", "mlp.dense_4h_to_h"),
    "bloom": ("self_attention.dense", "mlp.dense_4h_to_h"),
    "opt": ("self_attn.out_proj", "fc2"),
}
# tried in order for families not in the table: first attention-out name found, first MLP-out
_GENERIC_ATTN_OUT = (
    "self_attn.o_proj", "self_attn.out_proj", "attn.c_proj", "attn.out_proj", "attention.dense",
    "self_attention.dense", "attn.o_proj", "attention.o_proj",
)
_GENERIC_MLP_OUT = (
    "mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc_out", "mlp.fc2", "fc2",
    "feed_forward.down_proj", "mlp.w2",
)

# Families in which a writer's output is NORMALISED before it is added to the residual stream
# ("sandwich"/post-norm blocks):
#   gemma2, gemma3:  h = h + post_attention_layernorm(o_proj(...));
#                    h = h + post_feedforward_layernorm(down_proj(...))
#   olmo2:           h = h + post_attention_layernorm(o_proj(...));
#                    h = h + post_feedforward_layernorm(down_proj(...))   (no pre-norms at all)
# For these, orthogonalising the writer weight against a direction r does NOT remove r from the
# residual: the norm's learned per-channel scale (and the RMS rescale) maps the writer's
# r-free output back onto a vector with a component along r. Weight orthogonalisation
# (abliteration) is only exact where writes_directly is True.
# Every other family listed above is pre-norm: the writer output is added unchanged. gpt_neox
# with use_parallel_residual (the default) computes h + attn(ln1(h)) + mlp(ln2(h)): both writers
# still add directly into the residual, they just read the same input.
_POST_NORM_FAMILIES = frozenset({"gemma2", "gemma3", "gemma3_text", "olmo2"})


def writers_write_directly(family: str) -> bool:
    """Whether the writers' outputs are added to the residual stream unchanged (no post-norm)."""
    return family not in _POST_NORM_FAMILIES


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def writer_out_dim(module: nn.Module) -> int:
    """Which dimension of ``module.weight`` is the residual (output) dimension.

    ``nn.Linear`` stores ``weight`` as ``(out_features, in_features)`` -> 0. GPT-2's transformers
    ``Conv1D`` stores it transposed, ``(in_features, out_features)`` -> 1. Orthogonalising a
    writer against a unit direction ``r`` is therefore ``W -= r ⊗ (r @ W)`` along dim 0 for
    Linear and ``W -= (W @ r) ⊗ r`` along dim 1 for Conv1D; the bias (length = residual dim)
    is handled the same in both.
    """
    if isinstance(module, nn.Linear):
        return 0
    if _is_conv1d(module):
        return 1
    raise TypeError(f"unsupported writer module type {type(module).__name__}")


def residual_writers(parts: ModelParts, layer: int) -> list[nn.Module]:
    """The modules of block ``layer`` whose outputs are added into the residual stream.

    Returns ``[attention output projection, MLP down projection]``: ``nn.Linear`` for every
    family except gpt2 (transformers ``Conv1D``; see :func:`writer_out_dim`). Whether the
    outputs reach the residual unchanged is :func:`writers_write_directly`.
    """
    if not -parts.n_layers <= layer < parts.n_layers:
        raise UserError(f"layer {layer} out of range: the model has {parts.n_layers} layers")
    block = parts.blocks[layer]
    paths = _WRITERS.get(parts.family)
    if paths is not None:
        mods = [_get(block, p) for p in paths]
        if all(m is not None for m in mods):
            return mods  # type: ignore[return-value]
    found = []
    for candidates in (_GENERIC_ATTN_OUT, _GENERIC_MLP_OUT):
        mod = next((m for m in (_get(block, p) for p in candidates) if m is not None), None)
        if mod is None:
            raise UserError(
                f"cannot locate the residual writers of a {parts.family!r} block "
                f"({type(block).__name__}): unsupported architecture"
            )
        found.append(mod)
    return found
