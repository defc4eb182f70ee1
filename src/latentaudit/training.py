"""Supervised fine-tuning pieces shared by the fine-tuning attack and the model zoo: pairs
encoded exactly as generation formats prompts, loss only on completion tokens."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .models.chat import format_prompt, has_chat_template
from .models.generate import cache_kwargs, forward_cache, greedy_config


def stop_ids(tok) -> set[int]:
    eos = greedy_config(tok, 1).eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos])
    return {i for i in ids if i is not None}


def encode_pair(tok, prompt: str, completion: str, *, system: str | None = None,
                end_of_turn: bool = True, max_completion_tokens: int | None = None
                ) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids): the prompt exactly as generation formats and tokenises it,
    the completion as the chat template continues it, through its end-of-turn token when
    ``end_of_turn`` (the completion is cut at ``max_completion_tokens`` first; a cut completion
    gets no end token)."""
    chat = has_chat_template(tok)
    prefix = format_prompt(tok, prompt, system)
    p_ids = tok(prefix, add_special_tokens=not chat)["input_ids"]
    # the end of the assistant turn: the first generation stop id or special token after it
    stops = stop_ids(tok) | set(getattr(tok, "all_special_ids", []) or [])
    body: list[int]
    end: list[int] = []
    suffix_text = None
    if chat:
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        try:
            full = tok.apply_chat_template(msgs, tokenize=False)
        except Exception:  # templates that reject this shape: plain concatenation below
            full = None
        if isinstance(full, str) and full.startswith(prefix):
            suffix_text = full[len(prefix):]
    else:
        suffix_text = " " + completion
    if suffix_text is not None:
        ids = tok(suffix_text, add_special_tokens=False)["input_ids"]
        k = next((j for j, t in enumerate(ids) if t in stops), None)
        if k is None:
            body, end = ids, [tok.eos_token_id] if tok.eos_token_id is not None else []
        else:
            body, end = ids[:k], ids[k:k + 1]
    else:
        body = tok(completion, add_special_tokens=False)["input_ids"]
        end = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if max_completion_tokens is not None and len(body) > max_completion_tokens:
        body, end_of_turn = body[:max_completion_tokens], False
    return p_ids, body + (end if end_of_turn else [])


@dataclass
class Example:
    ids: list[int]
    n_prompt: int


def collate(examples: list[Example], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels -100 on prompt and padding (real tokens start at position 0)."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        mask[i, :n] = 1
        labels[i, e.n_prompt:n] = ids[i, e.n_prompt:n]
    pos = torch.arange(width).unsqueeze(0).expand(len(examples), -1)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "position_ids": pos.to(device), "labels": labels.to(device)}


def common_prefix_length(batch: dict[str, torch.Tensor]) -> int:
    """Tokens at the start of every row of a right-padded training batch that are the same in
    all rows (the chat template's opening and default system prompt), stopping before the
    earliest target position's predecessor (its logits are needed). 0 for a single row."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if ids.shape[0] < 2:
        return 0
    has = labels != -100
    first = torch.where(has.any(-1), has.float().argmax(-1), ids.shape[1])  # per row
    limit = int(first.min()) - 1
    if limit < 1:
        return 0
    same = (ids[:, :limit] == ids[:1, :limit]).all(0) & (mask[:, :limit] == 1).all(0)
    same &= (batch["position_ids"][:, :limit] == batch["position_ids"][:1, :limit]).all(0)
    return int(same.long().cumprod(0).sum())


def _forward_logits(model, batch: dict[str, torch.Tensor], keep: int, shared: int) -> torch.Tensor:
    """Logits of the last ``keep`` positions. With ``shared`` > 0 the first ``shared`` positions
    (the same in every row) run once, as a batch of one, and the rest of each row attends to
    that prefix's keys and values; gradients flow through the prefix as through the rows."""
    ids, mask, pos = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=pos)
    if shared:
        cache = forward_cache(model, input_ids=ids[:1, :shared], attention_mask=mask[:1, :shared],
                              position_ids=pos[:1, :shared])
        if cache is not None:
            cache.batch_repeat_interleave(ids.shape[0])
            kwargs = dict(input_ids=ids[:, shared:], attention_mask=mask,
                          position_ids=pos[:, shared:], use_cache=True,
                          **cache_kwargs(model, cache))
    width = kwargs["input_ids"].shape[1]
    logits = None
    if keep < width:
        try:
            logits = model(**kwargs, logits_to_keep=keep).logits
        except TypeError:  # an architecture without logits_to_keep
            logits = None
    if logits is None:
        logits = model(**kwargs).logits
    return logits[:, -keep:]


def token_nll(model, batch: dict[str, torch.Tensor], share_prefix: bool = False):
    """(sum of target-token NLL per row, number of target tokens per row). ``share_prefix``:
    run the rows' common prefix once (same loss and gradients; not under hooks that perturb
    every position of the batch, which expect whole rows)."""
    labels = batch["labels"]
    width = labels.shape[1]
    has = (labels != -100).any(0)
    first_label = int(has.float().argmax()) if bool(has.any()) else width - 1
    # the head runs only from the position before the first label on (prompt logits are not
    # needed: about a third of the head's cost on prompt-heavy batches)
    keep = min(width, max(2, width - max(first_label - 1, 0)))
    shared = common_prefix_length(batch) if share_prefix else 0
    logits = _forward_logits(model, batch, keep, min(shared, width - keep))
    logits = logits[:, :-1].float()
    tgt = labels[:, width - keep + 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1).clamp(min=0), reduction="none"
    ).view_as(tgt)
    valid = (tgt != -100)
    return (nll * valid).sum(-1), valid.sum(-1)


def batch_stream(n: int, batch_size: int, seed: int):
    """Index batches cycling through ``range(n)`` in a seeded shuffled order (new permutation
    every epoch)."""
    rng = np.random.default_rng(seed)
    buf: list[int] = []
    while True:
        while len(buf) < batch_size:
            buf += rng.permutation(n).tolist()
        yield buf[:batch_size]
        buf = buf[batch_size:]


