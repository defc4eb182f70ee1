"""Locating the parts of causal LMs (models/arch.py) and the tiny offline models (models/tiny.py).

Facts recorded here about transformers 5.x (checked on 5.24):

* every decoder block of every family in FAMILIES returns a bare ``torch.Tensor`` (no tuple) —
  see ``BLOCK_RETURNS``; hooks must still accept a tuple (older versions, other families);
* ``hidden_states`` are collected by transformers' own forward hooks on the blocks:
  ``hidden_states[0]`` is block 0's input, ``hidden_states[l + 1]`` is block ``l``'s output for
  ``l < n_layers - 1``, and ``hidden_states[-1]`` is overwritten with ``last_hidden_state`` =
  ``final_norm(output of the last block)`` (``capture_outputs(tie_last_hidden_states=True)``);
* those capture hooks are installed lazily on the first ``output_hidden_states=True`` call, and
  forward hooks run in registration order: an intervention hook shows up in ``hidden_states``
  only if it runs before the capture hook (register it with ``prepend=True``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from latentaudit.errors import UserError
from latentaudit.models.arch import (
    ModelParts,
    locate_parts,
    residual_writers,
    site_name,
    writer_out_dim,
    writers_write_directly,
)
from latentaudit.models.tiny import FAMILIES, tiny_config, tiny_model, tiny_tokenizer

# family -> (block path, final-norm path, embedding path, [attn-out writer, mlp-out writer])
EXPECTED = {
    "llama": ("model.layers", "model.norm", "model.embed_tokens", ["self_attn.o_proj", "mlp.down_proj"]),
    "qwen2": ("model.layers", "model.norm", "model.embed_tokens", ["self_attn.o_proj", "mlp.down_proj"]),
    "mistral": ("model.layers", "model.norm", "model.embed_tokens", ["self_attn.o_proj", "mlp.down_proj"]),
    "gemma": ("model.layers", "model.norm", "model.embed_tokens", ["self_attn.o_proj", "mlp.down_proj"]),
    "gemma2": ("model.layers", "model.norm", "model.embed_tokens", ["self_attn.o_proj", "mlp.down_proj"]),
    "phi3": ("model.layers", "model.norm", "model.embed_tokens", ["self_attn.o_proj", "mlp.down_proj"]),
    "olmo": ("model.layers", "model.norm", "model.embed_tokens", ["self_attn.o_proj", "mlp.down_proj"]),
    "olmo2": ("model.layers", "model.norm", "model.embed_tokens", ["self_attn.o_proj", "mlp.down_proj"]),
    "gpt2": ("transformer.h", "transformer.ln_f", "transformer.wte", ["attn.c_proj", "mlp.c_proj"]),
    "gpt_neox": (
        "gpt_neox.layers", "gpt_neox.final_layer_norm", "gpt_neox.embed_in",
        ["attention.dense", "mlp.dense_4h_to_h"],
    ),
}
# What a decoder block's forward returns in transformers 5.x, per family.
BLOCK_RETURNS = {fam: "tensor" for fam in EXPECTED}
# Families whose writer outputs are normalised before the residual add (post-norm blocks).
POST_NORM = {"gemma2", "olmo2"}

PROMPTS = ["Sure, here is", "I cannot help with that, sorry."]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy 2-core machine OpenMP contention made
    each 64-wide linear cost ~20 ms instead of ~20 us: run this module single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {}


def _model(models: dict, family: str) -> nn.Module:
    if family not in models:
        models[family] = tiny_model(family)
    return models[family]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _batch():
    return tiny_tokenizer()(PROMPTS, return_tensors="pt", padding=True)


def test_families_cover_expectations():
    assert set(FAMILIES) == set(EXPECTED)
    assert {"llama", "qwen2", "mistral", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox", "olmo2"} <= set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_locate_parts(models, family):
    model = _model(models, family)
    parts = locate_parts(model)
    block_path, norm_path, embed_path, _ = EXPECTED[family]
    cfg = model.config
    n_cfg = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    assert isinstance(parts, ModelParts)
    assert parts.family == family
    assert parts.n_layers == n_cfg == len(parts.blocks) == 4
    assert parts.hidden_size == 64
    assert parts.block_path == block_path
    assert parts.blocks is model.get_submodule(block_path)
    assert parts.final_norm is not None and parts.final_norm is model.get_submodule(norm_path)
    assert parts.embed is model.get_input_embeddings() is model.get_submodule(embed_path)
    assert isinstance(parts.embed, nn.Embedding)
    assert parts.lm_head is model.get_output_embeddings()


@pytest.mark.parametrize("family", FAMILIES)
def test_generic_fallback_matches_table(models, family, monkeypatch):
    """With the family table out of the way the generic search finds the same parts."""
    from latentaudit.models import arch

    model = _model(models, family)
    expected = locate_parts(model)
    monkeypatch.setattr(arch, "_FAMILY_PATHS", {})
    found = locate_parts(model)
    assert found.blocks is expected.blocks
    assert found.final_norm is expected.final_norm
    assert found.embed is expected.embed
    assert found.lm_head is expected.lm_head
    assert found.block_path == expected.block_path


@pytest.mark.parametrize("family", FAMILIES)
def test_block_outputs_and_hidden_states(models, family):
    model = _model(models, family)
    parts = locate_parts(model)
    seen: dict[int, object] = {}
    handles = [
        block.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, out))
        for i, block in enumerate(parts.blocks)
    ]
    try:
        with torch.no_grad():
            out = model(**_batch(), output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    hs = out.hidden_states
    assert len(hs) == parts.n_layers + 1
    kind = {"tensor" if isinstance(o, torch.Tensor) else "tuple" for o in seen.values()}
    assert kind == {BLOCK_RETURNS[family]}
    for layer in range(parts.n_layers - 1):
        assert torch.equal(_first(seen[layer]), hs[layer + 1]), layer
    last = _first(seen[parts.n_layers - 1])
    # transformers 5.x: hidden_states[-1] is last_hidden_state = final_norm(last block output)
    assert not torch.allclose(last, hs[-1])
    with torch.no_grad():
        torch.testing.assert_close(parts.final_norm(last), hs[-1], rtol=0, atol=1e-6)


def test_prepended_hook_is_seen_by_hidden_states(models):
    """transformers captures hidden_states with its own block hooks: order matters."""
    model = _model(models, "llama")
    parts = locate_parts(model)
    batch = _batch()
    with torch.no_grad():
        clean = model(**batch, output_hidden_states=True).hidden_states  # installs capture hooks

        def push(mod, args, out):
            return (_first(out) + 1.0,) + tuple(out[1:]) if isinstance(out, tuple) else out + 1.0

        for prepend, shifted in ((False, False), (True, True)):
            h = parts.blocks[1].register_forward_hook(push, prepend=prepend)
            try:
                hs = model(**batch, output_hidden_states=True).hidden_states
            finally:
                h.remove()
            assert torch.equal(hs[2], clean[2] + 1.0) is shifted
            assert not torch.allclose(hs[3], clean[3])  # the push reaches later blocks either way


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_writers(models, family):
    model = _model(models, family)
    parts = locate_parts(model)
    expected_paths = EXPECTED[family][3]
    for layer in (0, parts.n_layers - 1):
        writers = residual_writers(parts, layer)
        block = parts.blocks[layer]
        assert len(writers) == 2
        for mod, path in zip(writers, expected_paths):
            assert mod is block.get_submodule(path)
            dim = writer_out_dim(mod)
            assert mod.weight.shape[dim] == parts.hidden_size
            if family == "gpt2":
                assert type(mod).__name__ == "Conv1D" and dim == 1
            else:
                assert isinstance(mod, nn.Linear) and dim == 0
    assert writers_write_directly(family) is (family not in POST_NORM)
    with pytest.raises(UserError):
        residual_writers(parts, parts.n_layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_orthogonalised_writers_remove_direction(family):
    """Orthogonalise both writers of a block against r: the block's residual update loses r exactly
    when writers_write_directly(family). Validates residual_writers, writer_out_dim and the flag."""
    model = tiny_model(family, seed=1)
    parts = locate_parts(model)
    layer = 1
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # non-trivial norm scales, so a post-norm is not a mere rescale
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name.split(".")[-2]:
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen))
        r = torch.randn(parts.hidden_size, generator=gen)
        r /= r.norm()
        for mod in residual_writers(parts, layer):
            w = mod.weight
            if writer_out_dim(mod) == 0:  # Linear: (out, in)
                w -= torch.outer(r, r @ w)
            else:  # Conv1D: (in, out)
                w -= torch.outer(w @ r, r)
            if getattr(mod, "bias", None) is not None:
                mod.bias -= r * (mod.bias @ r)

    io: dict[str, torch.Tensor] = {}

    def pre(mod, args, kwargs):
        io["in"] = args[0] if args else kwargs["hidden_states"]

    def post(mod, args, out):
        io["out"] = _first(out)

    block = parts.blocks[layer]
    handles = [block.register_forward_pre_hook(pre, with_kwargs=True), block.register_forward_hook(post)]
    try:
        with torch.no_grad():
            model(**_batch())
    finally:
        for h in handles:
            h.remove()
    delta = io["out"] - io["in"]
    rel = ((delta @ r).abs().max() / delta.norm(dim=-1).max()).item()
    if writers_write_directly(family):
        assert rel < 1e-5
    else:
        assert rel > 1e-3


def test_site_name():
    assert site_name(0) == "blocks.0.resid_post"
    assert site_name(11) == "blocks.11.resid_post"


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_tiny_model_deterministic(family):
    before = torch.random.get_rng_state()
    a, b, c = tiny_model(family, seed=0), tiny_model(family, seed=0), tiny_model(family, seed=1)
    assert torch.equal(before, torch.random.get_rng_state())  # caller's RNG untouched
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert not a.training
    assert all(p.dtype == torch.float32 for p in a.parameters())


def test_tiny_config():
    tok = tiny_tokenizer()
    cfg = tiny_config("llama", num_hidden_layers=2)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 2, 4)
    assert (cfg.num_key_value_heads, cfg.intermediate_size, cfg.max_position_embeddings) == (2, 128, 256)
    assert cfg.vocab_size == len(tok)
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (
        tok.pad_token_id, tok.bos_token_id, tok.eos_token_id,
    )
    g = tiny_config("gpt2")
    assert (g.n_embd, g.n_layer, g.n_head, g.n_positions, g.vocab_size) == (64, 4, 4, 256, len(tok))


def test_tiny_tokenizer():
    tok = tiny_tokenizer()
    assert tok is tiny_tokenizer()
    assert 512 <= len(tok) <= 1024
    assert tok.padding_side == "left"
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == ("<|endoftext|>", "<|endoftext|>", "<pad>")
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]) == [0, 1, 2, 3]
    for word in ("Sure", "here", "is", "I", "cannot", "help", "sorry", "with", "that"):
        assert min(len(tok.tokenize(word)), len(tok.tokenize(" " + word))) == 1, word
    text = "Sure, here is how. I cannot help with that, sorry."
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: lossless, no auto bos

    msgs = [{"role": "user", "content": "How do I bake bread?"}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\n"
    no_gen = tok.apply_chat_template(msgs, tokenize=False)
    assert no_gen == "<|im_start|>user\nHow do I bake bread?<|im_end|>\n"
    two = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *msgs, {"role": "assistant", "content": "Sure."}],
        tokenize=False,
    )
    assert two == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHow do I bake bread?<|im_end|>\n"
        "<|im_start|>assistant\nSure.<|im_end|>\n"
    )
    ids = tok(prompt)["input_ids"]
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1

    batch = tok(["hi", "a much longer sentence than the first"], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n_short = int(mask[0].sum())
    assert 0 < n_short < ids.shape[1]
    assert (ids[0, : ids.shape[1] - n_short] == tok.pad_token_id).all()
    assert (mask[0, : ids.shape[1] - n_short] == 0).all() and (mask[0, -n_short:] == 1).all()
    assert mask[1].all()


def test_tiny_tokenizer_deterministic_across_processes():
    """The BPE training gives the same tokenizer in a fresh process (other hash seed, 1 thread)."""
    from latentaudit.models import tiny

    local = tiny._train_bpe().to_str()
    assert tiny._train_bpe().to_str() == local
    assert tiny_tokenizer().get_vocab() == tiny._train_bpe().get_vocab(with_added_tokens=True)
    # load tiny.py on its own: only `tokenizers` is imported, so the subprocess is fast
    code = (
        "import importlib.util, sys; "
        "spec = importlib.util.spec_from_file_location('tiny_alone', sys.argv[1]); "
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); "
        "sys.stdout.write(mod._train_bpe().to_str())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "RAYON_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-c", code, tiny.__file__], env=env, capture_output=True, text=True, check=True
    )
    assert hashlib.sha256(res.stdout.encode()).hexdigest() == hashlib.sha256(local.encode()).hexdigest()


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_peft_wrapped_model():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    plain = locate_parts(model)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    parts = locate_parts(wrapped)
    assert parts.blocks is plain.blocks and parts.final_norm is plain.final_norm
    assert wrapped.get_submodule(parts.block_path) is parts.blocks
    assert parts.block_path.endswith("model.layers")


class _NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = tiny_config("llama")
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])  # 3 != 4 layers
        self.head = nn.Linear(8, 10)

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head


def test_locate_parts_unknown_structure_raises():
    with pytest.raises(UserError) as err:
        locate_parts(_NoBlocks())
    msg = str(err.value)
    assert "decoder blocks" in msg and "\n" not in msg
    with pytest.raises(UserError):
        locate_parts(nn.Linear(3, 3))
