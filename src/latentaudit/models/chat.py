"""Chat formatting through the tokenizer's own template.

A tokenizer without a chat template gets the plain format ``PLAIN_FORMAT`` (documented in the
README) and a warning, once per tokenizer. The text a template produces already holds the
model's special tokens, so it is tokenized with ``add_special_tokens=False``; the plain format is
tokenized with them.
"""

from __future__ import annotations

import warnings

import torch

PLAIN_FORMAT = "User: {prompt}\nAssistant:"

_warned: set[int] = set()


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer, prompt: str, system: str | None = None) -> str:
    if not has_chat_template(tokenizer):
        if id(tokenizer) not in _warned:
            _warned.add(id(tokenizer))
            warnings.warn(
                "tokenizer has no chat template; using the plain format "
                f"{PLAIN_FORMAT!r}", stacklevel=2,
            )
        text = PLAIN_FORMAT.format(prompt=prompt)
        return f"{system}\n\n{text}" if system else text
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def format_prompts(tokenizer, prompts: list[str], system: str | None = None) -> list[str]:
    return [format_prompt(tokenizer, p, system) for p in prompts]


def encode(tokenizer, texts: list[str], device=None) -> dict[str, torch.Tensor]:
    """Tokenize formatted prompts as one left-padded batch.

    Returns input_ids, attention_mask and position_ids ([batch, seq]; position ids count real
    tokens only, so a left-padded row starts at 0 — a bare forward needs them, ``generate``
    derives them itself).
    """
    add_special = not has_chat_template(tokenizer)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special)
    finally:
        tokenizer.padding_side = old_side
    mask = batch["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = {"input_ids": batch["input_ids"], "attention_mask": mask, "position_ids": pos}
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out


def token_lengths(tokenizer, texts: list[str]) -> list[int]:
    add_special = not has_chat_template(tokenizer)
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=add_special)["input_ids"]]
