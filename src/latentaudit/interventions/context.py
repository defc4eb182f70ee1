"""What every family needs about the prompts under attack, computed once per model.

``AttackContext`` holds, per harmful prompt: the chat-formatted prompt token ids, the target
token ids (for targeted attacks), and the clean hidden states at every block output together
with the positions the intervention may touch there (``positions.position_mask``). Families
produce explicit per-prompt perturbations δ_i [n_i, d] from it, and ``generate_perturbed``
replays them during greedy generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..models.chat import format_prompts, has_chat_template
from ..models.generate import Generation, _decode, greedy_config, length_sorted_batches
from ..models.memory import fitting_batch, generation_row_bytes, run_batches
from .budget import RelativeBudget
from .hooks import hook_outputs, perturb_block
from .positions import DEFAULT_SINK_FACTOR, position_mask

GENERIC_TARGET = "Sure, here is a detailed answer to your request"


@dataclass
class AttackContext:
    lm: object
    texts: list[str]  # raw user prompts
    prompt_ids: list[list[int]]
    target_ids: list[list[int]]
    positions: str = "prompt"
    sink_factor: float | None = DEFAULT_SINK_FACTOR
    system: str | None = None
    h: list[torch.Tensor] = field(default_factory=list)  # per prompt [L, n_i, d] clean block outputs
    masks: list[torch.Tensor] = field(default_factory=list)  # per prompt [L, n_i] bool
    budget: RelativeBudget = field(default_factory=RelativeBudget)  # how ε bounds a push

    @property
    def n(self) -> int:
        return len(self.texts)


def _ids(tok, texts: list[str], special: bool) -> list[list[int]]:
    return tok(texts, add_special_tokens=special)["input_ids"]


def build_context(lm, texts: list[str], targets: list[str | None], positions: str = "prompt",
                  sink_factor: float | None = DEFAULT_SINK_FACTOR, system: str | None = None,
                  batch_size: int = 16) -> AttackContext:
    tok = lm.tokenizer
    formatted = format_prompts(tok, texts, system)
    prompt_ids = _ids(tok, formatted, not has_chat_template(tok))
    target_ids = _ids(tok, [t or GENERIC_TARGET for t in targets], False)
    ctx = AttackContext(lm, list(texts), prompt_ids, target_ids, positions, sink_factor, system)
    ctx.h = [None] * len(texts)  # type: ignore[list-item]
    ctx.masks = [None] * len(texts)  # type: ignore[list-item]
    blocks = list(lm.parts.blocks)
    for idx in length_sorted_batches([len(p) for p in prompt_ids], batch_size):
        ids, mask, pos = pad_left([prompt_ids[i] for i in idx], tok.pad_token_id, lm.device)
        outs: list[torch.Tensor] = []

        def keep(h):
            outs.append(h.detach())
            return h

        with torch.inference_mode(), hook_outputs(blocks, keep):
            lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        hs = torch.stack(outs, 0)  # [L, b, t, d] in block order
        for j, i in enumerate(idx):
            n_i = len(prompt_ids[i])
            h_i = hs[:, j, -n_i:, :].float().cpu()  # [L, n_i, d]
            m_i = torch.stack([
                position_mask(hs[l, j : j + 1, -n_i:], mask[j : j + 1, -n_i:], positions,
                              sink_factor)[0].cpu()
                for l in range(len(blocks))
            ])
            ctx.h[i], ctx.masks[i] = h_i, m_i
    return ctx


def pad_left(rows: list[list[int]], pad_id: int, device=None):
    """Left-pad token id rows → input_ids, attention_mask, position_ids ([b, t])."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, t - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[j, t - len(r):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


@torch.inference_mode()
def generate_perturbed(
    ctx: AttackContext,
    layer: int | None,
    rows: list[int],
    deltas: list[torch.Tensor | None],
    max_new_tokens: int,
    step_fns: list | None = None,
    batch_size: int = 16,
) -> list[Generation]:
    """Greedy responses of prompts ``rows`` with δ_i [n_i, d] added at block ``layer``'s output
    on the prompt positions (δ None: clean). ``step_fns[i]`` (optional) maps the hidden state of
    each generated token of row i ([1, d]) to its δ (positions mode ``all``)."""
    lm, tok = ctx.lm, ctx.lm.tokenizer
    cfg = greedy_config(tok, max_new_tokens)
    out: list[Generation | None] = [None] * len(rows)
    lengths = [len(ctx.prompt_ids[r]) for r in rows]
    size = fitting_batch(lm, batch_size, generation_row_bytes(lm, max(lengths, default=0)
                                                              + max_new_tokens))

    def one(bidx: list[int]) -> None:
        ids, mask, _ = pad_left([ctx.prompt_ids[rows[k]] for k in bidx], tok.pad_token_id, lm.device)
        t = ids.shape[1]
        if layer is None or all(deltas[k] is None for k in bidx):
            run = _null()
        else:
            d = lm.parts.hidden_size
            delta = torch.zeros((len(bidx), t, d), dtype=torch.float32)
            for j, k in enumerate(bidx):
                if deltas[k] is not None:
                    delta[j, t - deltas[k].shape[0]:] = deltas[k].float().cpu()
            steps = [step_fns[k] for k in bidx] if step_fns else None
            step = None
            if steps and any(s is not None for s in steps):
                def step(h, steps=steps):  # h [b, 1, d]
                    rows_d = [s(h[j]) if s is not None else torch.zeros_like(h[j])
                              for j, s in enumerate(steps)]
                    return torch.stack(rows_d, 0)
            run = perturb_block(lm.parts.blocks[layer], delta.to(lm.device), step)
        with run:
            seqs = lm.model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
        for j, k in enumerate(bidx):
            out[k] = _decode(tok, seqs[j, t:])

    run_batches(length_sorted_batches(lengths, size), one, "generation", lm.model)
    return out  # type: ignore[return-value]


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False
