"""Batched greedy generation: prompts sorted by length, results in input order.

Chat-formatted prompts share a prefix (the template's opening, and the default system prompt
where the template has one: 24 of a mean 44 prompt tokens on SmolLM2's test prompts). Its keys and values are
computed once per call and reused by every batch: each row is laid out as
``shared prefix | padding | own suffix``, with the padding masked out, so position ids (counted
over real tokens) are those of the unpadded prompt. Without a shared prefix, rows are left-padded.
"""

from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .chat import encode, format_prompts, has_chat_template
from .memory import fitting_batch, generation_row_bytes, run_batches


@dataclass
class Generation:
    response: str
    n_new_tokens: int
    token_ids: list[int]


def greedy_config(tokenizer, max_new_tokens: int):
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    extra = getattr(tokenizer, "im_end_id", None)
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos if extra is None else [eos, extra],
        temperature=None,
        top_p=None,
        top_k=None,
    )


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so padding is small."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def shared_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix common to every row, leaving each row at least one
    token of its own (the last prompt token must be run to get the first answer's logits)."""
    if len(rows) < 2:
        return 0
    limit = min(len(r) for r in rows) - 1
    first = rows[0]
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n


@torch.inference_mode()
def greedy_generate(
    lm,
    prompts: list[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    system: str | None = None,
    on_batch: Callable[[list[int], list[Generation]], None] | None = None,
    share_prefix: bool = True,
) -> list[Generation]:
    """Greedy-decode ``max_new_tokens`` for each raw user prompt (chat-formatted here).

    ``on_batch(indices, generations)`` is called after every batch, so a caller can commit the
    results as soon as they are known. ``share_prefix`` computes the prompts' common token prefix
    once (see the module's docstring); ``False`` left-pads whole prompts (the reference path).
    """
    tok, model = lm.tokenizer, lm.model
    texts = format_prompts(tok, prompts, system)
    gen_cfg = greedy_config(tok, max_new_tokens)
    out: list[Generation | None] = [None] * len(texts)
    rows = tok(texts, add_special_tokens=not has_chat_template(tok))["input_ids"]
    n_shared = shared_prefix_length(rows) if share_prefix else 0
    prefix_cache = _prefix_cache(model, rows[0][:n_shared], lm.device) if n_shared else None
    lengths = [len(r) for r in rows]
    size = fitting_batch(lm, batch_size, generation_row_bytes(lm, max(lengths, default=0)
                                                              + max_new_tokens))

    def one(idx: list[int]) -> None:
        if prefix_cache is None:
            batch = encode(tok, [texts[i] for i in idx], device=lm.device)
            kwargs = {}
        else:
            batch = _middle_padded([rows[i] for i in idx], n_shared, tok.pad_token_id, lm.device)
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(idx))
            kwargs = cache_kwargs(model, cache)
        seqs = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            generation_config=gen_cfg,
            **kwargs,
        )
        new = seqs[:, batch["input_ids"].shape[1] :]
        gens = [_decode(tok, row) for row in new]
        for i, g in zip(idx, gens):
            out[i] = g
        if on_batch is not None:
            on_batch(idx, gens)

    run_batches(length_sorted_batches(lengths, size), one, "generation", model)
    return out  # type: ignore[return-value]


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` for ``model``'s forward and ``generate``: transformers 5 renamed
    ``past_key_values`` to ``cache`` within the range latentaudit supports, and an unknown
    keyword would be swallowed by ``**kwargs`` — the rows would silently not see the prefix."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    return {_cache_name(type(base)): cache}


@functools.cache
def _cache_name(cls) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def forward_cache(model, **inputs):
    """Run ``model`` on ``inputs`` keeping its key/value cache, and return that cache (None
    where the model keeps none). Gradients flow through it when the caller's mode allows."""
    res = model(**inputs, use_cache=True)
    cache = getattr(res, "cache", None)
    return cache if cache is not None else getattr(res, "past_key_values", None)


def _prefix_cache(model, prefix: list[int], device):
    """The key/value cache of the shared prefix (batch 1)."""
    ids = torch.tensor([prefix], device=device)
    return forward_cache(model, input_ids=ids, attention_mask=torch.ones_like(ids))


def _middle_padded(rows: list[list[int]], n_shared: int, pad_id: int, device) -> dict:
    """``prefix | pad | suffix`` rows with the padding masked out."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        gap = width - len(r)
        ids[j, :n_shared] = torch.tensor(r[:n_shared])
        ids[j, n_shared + gap:] = torch.tensor(r[n_shared:])
        mask[j, :n_shared] = 1
        mask[j, n_shared + gap:] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _decode(tok, row: torch.Tensor) -> Generation:
    ids = row.tolist()
    stops = {tok.pad_token_id, tok.eos_token_id}
    n = len(ids)
    for j, t in enumerate(ids):
        if t in stops:
            n = j
            break
    ids = ids[:n]
    return Generation(tok.decode(ids, skip_special_tokens=True).strip(), n, ids)
