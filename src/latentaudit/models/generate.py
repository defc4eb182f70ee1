"""Batched greedy generation: left padding, prompts sorted by length, results in input order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .chat import encode, format_prompts, token_lengths


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


@torch.inference_mode()
def greedy_generate(
    lm,
    prompts: list[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    system: str | None = None,
    on_batch: Callable[[list[int], list[Generation]], None] | None = None,
) -> list[Generation]:
    """Greedy-decode ``max_new_tokens`` for each raw user prompt (chat-formatted here).

    ``on_batch(indices, generations)`` is called after every batch, so a caller can commit the
    results as soon as they are known.
    """
    tok, model = lm.tokenizer, lm.model
    texts = format_prompts(tok, prompts, system)
    gen_cfg = greedy_config(tok, max_new_tokens)
    out: list[Generation | None] = [None] * len(texts)
    for idx in length_sorted_batches(token_lengths(tok, texts), batch_size):
        batch = encode(tok, [texts[i] for i in idx], device=lm.device)
        seqs = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            generation_config=gen_cfg,
        )
        new = seqs[:, batch["input_ids"].shape[1] :]
        gens = [_decode(tok, row) for row in new]
        for i, g in zip(idx, gens):
            out[i] = g
        if on_batch is not None:
            on_batch(idx, gens)
    return out  # type: ignore[return-value]


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
