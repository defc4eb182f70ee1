"""Prefix cache for interventions at one layer.

The clean activations of blocks 0..l do not depend on a perturbation added to the output of
block l, so they are computed once (one clean forward) and every PGD step runs only blocks
l+1..L−1, the final norm and the head. The arguments each later block receives (attention mask,
rotary position embeddings, position ids...) are captured from that clean forward with
forward pre-hooks, so no architecture is hard-coded.
"""

from __future__ import annotations

import torch

from .hooks import hook_outputs


class SuffixRunner:
    """``runner.logits(h_l)`` = the model's logits when block ``layer`` outputs ``h_l``."""

    def __init__(self, lm, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor):
        self.lm = lm
        self.layer = layer
        parts = lm.parts
        self.blocks = list(parts.blocks)[layer + 1 :]
        self.final_norm = parts.final_norm
        self.lm_head = parts.lm_head
        self.softcap = getattr(lm.model.config, "final_logit_softcapping", None)
        self.calls: list[tuple[tuple, dict]] = []
        captured: dict[int, tuple[tuple, dict]] = {}
        handles = []

        def capture(i):
            def pre(mod, args, kwargs):
                captured[i] = (tuple(args[1:]), dict(kwargs))
            return pre

        for i, b in enumerate(self.blocks):
            handles.append(b.register_forward_pre_hook(capture(i), with_kwargs=True))
        h_store = {}

        def keep(h):
            h_store["h"] = h
            return h

        try:
            with torch.no_grad(), hook_outputs([parts.blocks[layer]], keep):
                lm.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        self.h_clean = h_store["h"].detach()  # [b, t, d]
        self.calls = [captured[i] for i in range(len(self.blocks))]

    def select(self, rows: torch.Tensor) -> "SuffixRunner":
        """The same runner for a subset of its batch rows (PGD drops rows that are done).

        Every captured block argument that is per-row — a tensor of 2+ dimensions whose first
        dimension is the batch — is indexed; shared ones (cache positions, broadcast [1, ...]
        tensors, None) are kept. Equivalence with the full runner is tested."""
        b = self.h_clean.shape[0]
        new = object.__new__(SuffixRunner)
        new.__dict__.update(self.__dict__)
        new.h_clean = self.h_clean[rows]
        new.calls = [(_take(args, rows, b), _take(kwargs, rows, b)) for args, kwargs in self.calls]
        return new

    def logits(self, h: torch.Tensor, keep: int = 0) -> torch.Tensor:
        """Logits [b, t, V] (or of the last ``keep`` positions only, when keep > 0)."""
        for block, (args, kwargs) in zip(self.blocks, self.calls):
            out = block(h, *args, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        if keep:
            h = h[:, -keep:]
        if self.final_norm is not None:
            h = self.final_norm(h)
        logits = self.lm_head(h)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _take(obj, rows: torch.Tensor, b: int):
    if isinstance(obj, torch.Tensor):
        return obj[rows] if obj.dim() >= 2 and obj.shape[0] == b else obj
    if isinstance(obj, tuple):
        return tuple(_take(o, rows, b) for o in obj)
    if isinstance(obj, list):
        return [_take(o, rows, b) for o in obj]
    if isinstance(obj, dict):
        return {k: _take(v, rows, b) for k, v in obj.items()}
    return obj


class FullRunner:
    """Reference without the prefix cache: the whole model runs every time, the perturbation
    enters through a hook on block ``layer`` (used by tests and the benchmark)."""

    def __init__(self, lm, layer: int, input_ids, attention_mask, position_ids):
        self.lm, self.layer = lm, layer
        self.inputs = dict(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids, use_cache=False)
        h_store = {}

        def keep(h):
            h_store["h"] = h
            return h

        with torch.no_grad(), hook_outputs([lm.parts.blocks[layer]], keep):
            lm.model(**self.inputs)
        self.h_clean = h_store["h"].detach()

    def select(self, rows: torch.Tensor) -> "FullRunner":
        new = object.__new__(FullRunner)
        new.lm, new.layer = self.lm, self.layer
        new.inputs = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in self.inputs.items()}
        new.h_clean = self.h_clean[rows]
        return new

    def logits(self, h: torch.Tensor, keep: int = 0) -> torch.Tensor:
        with hook_outputs([self.lm.parts.blocks[self.layer]], lambda _: h):
            return self.lm.model(**self.inputs, logits_to_keep=keep).logits
