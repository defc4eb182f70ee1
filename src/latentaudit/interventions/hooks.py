"""Forward hooks that change a decoder block's output, removed on exit (even on exceptions).

A block may return a bare tensor (every family in transformers 5.x) or a tuple whose first item
is the hidden state (older versions, some remote-code models); both are handled. Hooks are
registered with ``prepend=True`` so that they run before transformers' own output-capturing
hooks (``output_hidden_states`` then reports the perturbed state). Under ``device_map``
sharding the perturbation is moved to the device of the block's output.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

HiddenFn = Callable[[torch.Tensor], torch.Tensor]


def _apply(output, fn: HiddenFn):
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple):
        return (fn(output[0]),) + tuple(output[1:])
    if hasattr(output, "last_hidden_state"):  # a ModelOutput
        output.last_hidden_state = fn(output.last_hidden_state)
        return output
    raise TypeError(f"cannot intervene on a block output of type {type(output).__name__}")


@contextlib.contextmanager
def hook_outputs(modules: Sequence[nn.Module], fn: HiddenFn) -> Iterator[None]:
    """While active, each module's output hidden state h is replaced by fn(h)."""
    handles = []
    try:
        for m in modules:
            handles.append(m.register_forward_hook(lambda mod, args, out: _apply(out, fn),
                                                   prepend=True))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def perturb_block(
    block: nn.Module,
    prefill: torch.Tensor | HiddenFn | None,
    step: HiddenFn | None = None,
) -> Iterator[dict]:
    """Add a perturbation to the output of one block.

    ``prefill`` is applied on the first forward through the block — the whole prompt (a bare
    forward, or the prefill of ``generate``): a tensor δ [batch, seq, d] is added as is, a
    callable maps the clean h to δ. ``step`` (optional) maps the hidden state of each later
    forward (one generated token at a time under the KV cache) to its δ. Yields a dict with the
    number of calls seen.
    """
    state = {"calls": 0}

    def fn(h: torch.Tensor) -> torch.Tensor:
        first = state["calls"] == 0
        state["calls"] += 1
        if first:
            d = prefill(h) if callable(prefill) else prefill
        else:
            d = step(h) if step is not None else None
        if d is None:
            return h
        return h + d.to(device=h.device, dtype=h.dtype)

    with hook_outputs([block], fn):
        yield state


def project_out(h: torch.Tensor, r_hat: torch.Tensor) -> torch.Tensor:
    """h − (h·r̂) r̂ along the last axis (r̂ a unit vector)."""
    r = r_hat.to(device=h.device, dtype=h.dtype)
    return h - (h @ r).unsqueeze(-1) * r


def ablation_sites(parts) -> list[nn.Module]:
    """Modules whose outputs write into the residual stream: the token embedding and, per block,
    the attention-output and MLP-down projections. Projecting r̂ out of each of them keeps the
    residual stream orthogonal to r̂ at every point (inside blocks too), which is exactly what
    weight orthogonalisation does. Families that normalise a writer's output before adding it
    (gemma2, olmo2) fall back to the block outputs."""
    from ..models.arch import residual_writers, writers_write_directly

    if writers_write_directly(parts.family):
        try:
            return [parts.embed] + [w for l in range(parts.n_layers)
                                    for w in residual_writers(parts, l)]
        except Exception:  # unknown writer names: block outputs are the next best thing
            pass
    return [parts.embed, *parts.blocks]


@contextlib.contextmanager
def ablate_direction(parts, r_hat: torch.Tensor) -> Iterator[None]:
    """Directional ablation: project r̂ out of everything that writes into the residual stream,
    at every position (unbounded; reported beside LVS)."""
    r = r_hat / r_hat.norm()
    with hook_outputs(ablation_sites(parts), lambda h: project_out(h, r)):
        yield
