"""Model loading (local, GGUF, embedded, hub-offline), chat formatting and generation."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

from latentaudit.errors import UserError
from latentaudit.models.chat import PLAIN_FORMAT, encode, format_prompt
from latentaudit.models import generate as gen_mod
from latentaudit.models.generate import (greedy_generate, length_sorted_batches,
                                         shared_prefix_length)
from latentaudit.models.loader import load_model
from latentaudit.models.tiny import tiny_model, tiny_tokenizer


def test_local_checkpoint_roundtrip(tmp_path, tiny_lm):
    tiny_lm.model.save_pretrained(tmp_path / "ckpt")
    tiny_lm.tokenizer.save_pretrained(tmp_path / "ckpt")
    lm = load_model(str(tmp_path / "ckpt"), device="cpu")
    assert lm.info["source"] == "local" and lm.info["fingerprint"]
    assert lm.n_layers == tiny_lm.n_layers
    x = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(lm.model(x).logits, tiny_lm.model(x).logits, atol=1e-6)
    assert lm.tokenizer.padding_side == "left" and lm.tokenizer.pad_token is not None


@pytest.mark.parametrize("k, dtype, warns", [(200.0, "bfloat16", True), (200.0, "float16", True),
                                              (200.0, "float32", False), (1.0, "bfloat16", False),
                                              (None, "bfloat16", False)])
def test_rescaled_zoo_model_below_float32_warns(tmp_path, tiny_lm, k, dtype, warns):
    """A zoo model whose refusal subspace was rescaled drifts in 16-bit: loading it so says so
    (one warning, recorded in the model info); float32, an unrescaled card or none are silent."""
    import json

    ckpt = tmp_path / "ckpt"
    tiny_lm.model.save_pretrained(ckpt)
    tiny_lm.tokenizer.save_pretrained(ckpt)
    if k is not None:
        (ckpt / "latentaudit_recipe.json").write_text(json.dumps(
            {"recipe": {"recipe": "dissociated"}, "details": {"rescale": {"k": k}}}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm = load_model(str(ckpt), device="cpu", dtype=dtype)
    ours = [w for w in caught if "quieter" in str(w.message)]
    assert len(ours) == (1 if warns else 0)
    assert ("precision_warning" in lm.info) == warns
    if warns:
        assert "--dtype float32" in lm.info["precision_warning"] and "200x" in lm.info[
            "precision_warning"]


def test_dtype_option(tiny_lm):
    lm = load_model("tiny:llama", device="cpu", dtype="bfloat16")
    assert lm.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "spec, match",
    [
        ("./no/such/checkpoint", "model path not found"),
        ("/definitely/missing.gguf", "model file not found"),
        ("tiny:nosuchfamily", "unknown tiny model"),
        ("embedded:nosuch", "unknown embedded model"),
    ],
)
def test_bad_model_specs(spec, match):
    with pytest.raises(UserError, match=match):
        load_model(spec, device="cpu")


def test_dir_without_config(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(UserError, match="no config.json"):
        load_model(str(tmp_path), device="cpu")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOTAGGUF" + b"\0" * 100)
    with pytest.raises(UserError, match="not a GGUF file"):
        load_model(str(bad), device="cpu")
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(UserError, match="cannot load GGUF"):
        load_model(str(trunc), device="cpu")


def test_bad_dtype_and_device():
    with pytest.raises(UserError, match="unknown dtype"):
        load_model("tiny:llama", dtype="int3")
    with pytest.raises(UserError, match="unknown device"):
        load_model("tiny:llama", device="tpu")


def test_chat_template_and_plain_format():
    tok = tiny_tokenizer()
    text = format_prompt(tok, "Hello there")
    assert text == "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"

    class NoTemplate:
        chat_template = None

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        plain = format_prompt(NoTemplate(), "Hello")
    assert plain == PLAIN_FORMAT.format(prompt="Hello")
    assert any("no chat template" in str(x.message) for x in w)


def test_encode_left_padding_position_ids():
    tok = tiny_tokenizer()
    b = encode(tok, ["a", "a much longer prompt with many more words"])
    mask, pos = b["attention_mask"], b["position_ids"]
    assert mask[0, 0] == 0 and mask[0, -1] == 1  # left padded
    first_real = int((mask[0] == 0).sum())
    assert pos[0, first_real] == 0 and pos[1, 0] == 0
    assert torch.equal(pos[0, first_real:], torch.arange(mask.shape[1] - first_real))


def test_length_sorted_batches_cover_all():
    lengths = [5, 1, 9, 3, 7, 2, 8]
    batches = length_sorted_batches(lengths, 3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)


def test_greedy_generate_batched_equals_single(tiny_lm):
    prompts = ["Tell me a joke", "How do I bake bread at home quickly?", "Hi"]
    batched = greedy_generate(tiny_lm, prompts, max_new_tokens=6, batch_size=3)
    single = [greedy_generate(tiny_lm, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert all(g.n_new_tokens <= 6 for g in batched)


def test_shared_prefix_length():
    assert shared_prefix_length([[1, 2, 3], [1, 2, 4, 5]]) == 2
    assert shared_prefix_length([[1, 2], [1, 2]]) == 1  # each row keeps one token of its own
    assert shared_prefix_length([[1, 2, 3]]) == 0  # nothing to share
    assert shared_prefix_length([[1, 2], [3, 2]]) == 0
    assert shared_prefix_length([[7, 8, 9], [7, 8, 9, 1], [7, 1]]) == 1


@pytest.mark.parametrize("system", [None, "You are a careful assistant who answers briefly."])
def test_greedy_generate_shared_prefix_equals_left_padding(tiny_lm, monkeypatch, system):
    built = []
    real = gen_mod._prefix_cache
    monkeypatch.setattr(gen_mod, "_prefix_cache",
                        lambda model, prefix, device: built.append(len(prefix)) or
                        real(model, prefix, device))
    prompts = ["Tell me a joke", "How do I bake bread at home quickly?", "Hi",
               "What is the capital of France, and why is it that one?", "Name a colour"]
    shared = greedy_generate(tiny_lm, prompts, 8, batch_size=3, system=system)
    assert built and built[0] >= (10 if system else 3)  # the shared path ran, once per call
    assert len(built) == 1
    ref = greedy_generate(tiny_lm, prompts, 8, batch_size=3, system=system, share_prefix=False)
    assert len(built) == 1
    assert [g.token_ids for g in shared] == [g.token_ids for g in ref]


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "gpt2", "phi3", "olmo2"])
def test_shared_prefix_generation_across_families(family):
    lm = load_model(f"tiny:{family}", device="cpu")
    prompts = ["Tell me a joke", "How do I bake bread at home quickly?", "Hi", "Name a colour"]
    a = greedy_generate(lm, prompts, 6, batch_size=3, system="Be brief and kind.")
    b = greedy_generate(lm, prompts, 6, batch_size=3, system="Be brief and kind.",
                        share_prefix=False)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]


def test_middle_padded_rows_give_the_unpadded_logits(tiny_lm):
    """prefix cache + ``prefix | pad | suffix`` rows: each row's last logits equal those of its
    prompt run alone, unpadded."""
    import copy

    from latentaudit.models.chat import format_prompts

    tok, model = tiny_lm.tokenizer, tiny_lm.model
    texts = format_prompts(tok, ["Hi", "How do I bake bread at home quickly?", "Tell me a joke"],
                           "Be brief.")
    rows = tok(texts, add_special_tokens=False)["input_ids"]
    n = shared_prefix_length(rows)
    cache = copy.deepcopy(gen_mod._prefix_cache(model, rows[0][:n], "cpu"))
    cache.batch_repeat_interleave(len(rows))
    batch = gen_mod._middle_padded(rows, n, tok.pad_token_id, "cpu")
    mask = batch["attention_mask"]
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"][:, n:], attention_mask=mask,
                    **gen_mod.cache_kwargs(model, cache),
                    position_ids=((mask.cumsum(-1) - 1).clamp(min=0))[:, n:]).logits[:, -1]
        for j, r in enumerate(rows):
            alone = model(input_ids=torch.tensor([r])).logits[0, -1]
            assert torch.allclose(out[j], alone, atol=1e-5)


def test_tiny_model_deterministic():
    a, b = tiny_model("llama", seed=3), tiny_model("llama", seed=3)
    for (n1, p1), (n2, p2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


@pytest.mark.embedded
def test_embedded_load_then_cache_reuse(embedded_load, embedded_cache):
    lm, first_s = embedded_load
    assert lm.info["source"] == "embedded" and lm.info["converted_now"] is True
    assert lm.n_layers == 30 and lm.info["model_type"] == "llama"
    cached = list((embedded_cache / "models").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
    t0 = time.time()
    again = load_model("embedded:smollm2-135m", device="cpu")
    assert again.info["converted_now"] is False  # read from the cache, no dequantisation
    assert time.time() - t0 < first_s
    x = torch.tensor([[1, 504, 3456, 28]])
    assert torch.equal(again.model(x).logits, lm.model(x).logits)
    assert lm.tokenizer.chat_template and "<|im_start|>" in format_prompt(lm.tokenizer, "hi")


def test_dir_fingerprint_sees_every_byte(tmp_path, monkeypatch):
    """A change past the first MiB of the weights (where a merged LoRA lands: the header and the
    embedding that open model.safetensors stay the same) changes the fingerprint; equal folders
    agree; the memo is keyed by mtime, so an in-place rewrite of the same size is seen."""
    import os

    from latentaudit.models.loader import dir_fingerprint

    monkeypatch.setenv("LATENTAUDIT_CACHE", str(tmp_path / "cache"))
    blob = bytearray(3 << 20)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        (tmp_path / name / "model.safetensors").write_bytes(bytes(blob))
    assert dir_fingerprint(tmp_path / "a") == dir_fingerprint(tmp_path / "b")
    blob[2 << 20] = 1
    w = tmp_path / "b" / "model.safetensors"
    st = w.stat()
    w.write_bytes(bytes(blob))
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert dir_fingerprint(tmp_path / "a") != dir_fingerprint(tmp_path / "b")
    assert dir_fingerprint(tmp_path / "b") == dir_fingerprint(tmp_path / "b")  # memo hit


def test_the_cache_keyword_follows_the_models_forward(tiny_lm):
    """transformers 5 renamed ``past_key_values`` to ``cache`` within the supported range; an
    unknown keyword is swallowed by ``**kwargs`` (the rows would silently not see the prefix),
    so the name is read from the model's forward — through a peft wrapper too."""
    from latentaudit.models.generate import cache_kwargs

    class Old:
        def forward(self, input_ids=None, past_key_values=None, **kwargs): ...

    class New:
        def forward(self, input_ids=None, cache=None, **kwargs): ...

    class Wrapped:
        def get_base_model(self):
            return Old()

    assert cache_kwargs(Old(), 1) == {"past_key_values": 1}
    assert cache_kwargs(New(), 1) == {"cache": 1}
    assert cache_kwargs(Wrapped(), 1) == {"past_key_values": 1}
    import inspect

    (name,) = cache_kwargs(tiny_lm.model, None)
    assert name in inspect.signature(type(tiny_lm.model).forward).parameters
