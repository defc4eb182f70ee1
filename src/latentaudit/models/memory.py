"""Accelerator memory: batch sizes capped by free memory, halved on out-of-memory.

Every batched loop of the audit (generation, PGD, the fine-tuning attack) runs its batches
through :func:`run_batches`. A batch that raises out-of-memory is split in halves and run
again; the halved size is kept for the rest of the process for that loop and model, so one
large batch does not fail again and again. The loop's callback runs once per finished batch,
so a result is stored exactly once however often its batch was split. Batch composition never
enters a store key, so a split batch resumes and reports like an unsplit one (greedy answers
can differ in rare near-ties, as they can between any two batch sizes under padding).
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Callable, Sequence, TypeVar

import torch

from ..errors import UserError

T = TypeVar("T")
R = TypeVar("R")

# (loop, model id) → the largest batch known to fit
_LIMITS: dict[tuple[str, int], int] = {}
# tests: raise out-of-memory for any batch larger than this (simulates a small GPU on the CPU)
FAULT_ENV = "LATENTAUDIT_FAULT_OOM_ABOVE"


def free_memory() -> None:
    """Return dropped tensors' memory (the collector, then the accelerator's cache)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    if isinstance(e, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        return True
    # MPS and some CUDA paths raise a plain RuntimeError
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def _fault(n: int) -> None:
    above = os.environ.get(FAULT_ENV)
    if above and n > int(above):
        raise torch.cuda.OutOfMemoryError(f"simulated: batch of {n} > {above} ({FAULT_ENV})")


def free_bytes(device) -> int | None:
    """Free memory of a CUDA device in bytes (None elsewhere: the CPU's batches are the
    configured ones)."""
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(dev)
    return int(free)


def generation_row_bytes(lm, n_tokens: int) -> int:
    """Rough bytes one generated row needs: its key/value cache over ``n_tokens`` and a
    float32 logits row, times 2 for the transient activations of a step."""
    c = lm.model.config
    c = getattr(c, "text_config", None) or c
    heads = getattr(c, "num_attention_heads", 1) or 1
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    elem = torch.finfo(lm.dtype).bits // 8 if lm.dtype.is_floating_point else 4
    cache = 2 * lm.n_layers * kv * head_dim * n_tokens * elem
    return 2 * (cache + 4 * c.vocab_size + n_tokens * c.hidden_size * elem * 4)


def fitting_batch(lm, configured: int, row_bytes: int, share: float = 0.6) -> int:
    """The configured batch size, capped so that ``share`` of the device's free memory holds
    the batch (unchanged off CUDA)."""
    free = free_bytes(lm.device)
    if free is None or row_bytes <= 0:
        return configured
    return max(1, min(configured, int(free * share) // row_bytes))


def run_batches(batches: Sequence[Sequence[T]], fn: Callable[[list[T]], None], loop: str,
                model=None) -> None:
    """Call ``fn(batch)`` for every item of ``batches`` exactly once, in order. A batch that
    runs out of memory is halved and its halves run instead; the size that fitted is kept for
    later calls of the same ``loop`` and ``model``. Out of memory with one row: one line
    (exit 2) that says what to lower."""
    key = (loop, id(model))
    queue = [list(b) for b in batches if len(b)]
    queue.reverse()  # a stack: pop() takes the next batch
    while queue:
        b = queue.pop()
        limit = _LIMITS.get(key)
        if limit is not None and len(b) > limit:
            queue.extend(reversed(_split(b, limit)))
            continue
        try:
            _fault(len(b))
            fn(b)
        except Exception as e:  # noqa: BLE001 — only out-of-memory is handled here
            if not is_oom(e):
                raise
            del e
            queue.extend(reversed(_split(b, _halve(key, len(b)))))


def retry_smaller(loop: str, model, size: int, attempt: Callable[[int], R]) -> R:
    """``attempt(size)`` (an all-or-nothing step that works in pieces of ``size`` rows), again
    with half the size after out-of-memory, until it fits; the size is kept like
    :func:`run_batches`'s."""
    key = (loop, id(model))
    size = min(size, _LIMITS.get(key, size))
    while True:
        try:
            _fault(size)
            return attempt(size)
        except Exception as e:  # noqa: BLE001 — only out-of-memory is handled here
            if not is_oom(e):
                raise
            del e
            size = _halve(key, size)


def _halve(key: tuple[str, int], n: int) -> int:
    free_memory()
    if n <= 1:
        raise UserError(f"{key[0]}: out of memory with a batch of one row; use a smaller model "
                        "or dtype (--dtype bfloat16), fewer new tokens, another device, or "
                        "--device sharded")
    half = (n + 1) // 2
    _LIMITS[key] = half
    print(f"note: {key[0]}: out of memory at a batch of {n}; continuing at {half}",
          file=sys.stderr, flush=True)
    return half


def _split(b: list[T], size: int) -> list[list[T]]:
    return [b[i:i + size] for i in range(0, len(b), size)]


def forget_limits() -> None:
    """Tests: start from the configured sizes again."""
    _LIMITS.clear()
