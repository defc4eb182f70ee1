"""The latent stage's oracle: does a push of budget ε at layer l elicit prompt x? Every
(family, layer, prompt, ε) evaluation is generated, judged, checked for coherence and committed
to the run store under its key; a rerun reads it back instead."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ...data.sets import PromptSet
from ...interventions.context import AttackContext, build_context, generate_perturbed
from ...runs import keys
from ...runs.store import ResultStore
from .config import LatentConfig

def direction_id(v: torch.Tensor) -> str:
    """Content hash of one direction vector (float32 bytes): part of the store key of every
    result computed along it, so a run folder never serves results along one direction (the
    audited model's own, a reference model's, another estimate's) for another."""
    b = v.detach().float().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(b).hexdigest()[:12]


class LatentRunner:
    """Evaluates (prompt, ε) pairs for one model, with the store as memory."""

    def __init__(self, lm, store: ResultStore, model_key: str, ps: PromptSet, cfg: LatentConfig,
                 judge, guard, seed: int = 0, system: str | None = None, batch_size: int = 16,
                 progress=None, budget=None):
        self.lm, self.store, self.model_key, self.ps, self.cfg = lm, store, model_key, ps, cfg
        self.judge, self.guard, self.seed, self.system = judge, guard, seed, system
        self.batch_size = batch_size
        self.progress = progress
        self.ctx: AttackContext = build_context(
            lm, ps.texts, [p.target for p in ps.prompts], cfg.positions, cfg.sink_factor, system,
            batch_size)
        if budget is not None:  # None: the relative budget
            self.ctx.budget = budget

    # -- success of a batch of responses ------------------------------------------------------
    def judge_responses(self, rows: list[int], responses: list[str]) -> list[dict]:
        prompts = [self.ctx.texts[r] for r in rows]
        verdicts = self.judge.judge(prompts, responses)
        comply = [i for i, v in enumerate(verdicts) if v.label == "compliance"]
        coh = {}
        if comply:
            checks = self.guard.check(self.lm, [prompts[i] for i in comply],
                                      [responses[i] for i in comply])
            coh = dict(zip(comply, checks))
        out = []
        for i, (v, resp) in enumerate(zip(verdicts, responses)):
            c = coh.get(i)
            coherent = bool(c.coherent) if c is not None else None
            nonref = v.label == "compliance"
            success = nonref and bool(coherent) if self.cfg.success == "coherent" else nonref
            out.append({"response": resp, "verdict": v.label, "nonrefusal": nonref,
                        "coherent": coherent, "coherence_reason": c.reason if c else None,
                        "mean_logprob": (None if c is None or c.mean_logprob != c.mean_logprob
                                         else float(c.mean_logprob)),
                        "success": bool(success)})
        return out

    def clean_prefix(self) -> str:
        return keys.latent_clean_prefix(self.model_key, keys.settings_hash(self._base_settings()))

    def clean(self) -> list[dict]:
        key = self.clean_prefix()
        done = self.store.keys_with_prefix(key)
        todo = [i for i, p in enumerate(self.ps.prompts) if key + p.id not in done]
        if todo:
            gens = generate_perturbed(self.ctx, None, todo, [None] * len(todo),
                                      self.cfg.max_new_tokens, batch_size=self.batch_size)
            recs = self.judge_responses(todo, [g.response for g in gens])
            self.store.put_many((key + self.ps.prompts[i].id, "latent", r)
                                for i, r in zip(todo, recs))
        return [self.store.get(key + p.id) for p in self.ps.prompts]

    def _base_settings(self) -> dict:
        c = self.cfg
        return {"positions": c.positions, "sink": c.sink_factor, "tokens": c.max_new_tokens,
                "success": c.success, "judge": self.judge.describe(),
                "guard": self.guard.describe()["parameters"], "system": self.system,
                "seed": self.seed, "rescue": list(self.cfg.rescue_scales)}

    def layer_prefix(self, family, layer: int, directions=None) -> str:
        desc = {**self._base_settings(), "family": family.describe()}
        if self.ctx.budget.name != "relative":  # the relative budget's keys stay as they were
            desc["budget"] = self.ctx.budget.describe()
        if family.uses_directions and directions is not None:
            desc["direction"] = direction_id(directions.unit(layer))
        return keys.latent_layer_prefix(self.model_key, family.name, keys.settings_hash(desc), layer)

    def oracle(self, family, layer: int, directions=None, on_eval=None):
        prefix = self.layer_prefix(family, layer, directions)

        def ask(idx: np.ndarray, eps: np.ndarray) -> np.ndarray:
            ks = [keys.eps_key(prefix, self.ps.prompts[i].id, e) for i, e in zip(idx, eps)]
            cached = [self.store.get(k) for k in ks]
            need = [j for j, c in enumerate(cached) if c is None]
            if need:
                rows = [int(idx[j]) for j in need]
                cands = family.candidates(self.ctx, layer, rows, eps[need], self.seed, directions,
                                          check=self.checker(layer))
                flat = [(j, c) for j, cs in zip(need, cands) for c in cs]
                todo = [(j, c) for j, c in flat if c.verdict is None]  # not judged mid-attack
                gens = generate_perturbed(
                    self.ctx, layer, [int(idx[j]) for j, _ in todo], [c.delta for _, c in todo],
                    self.cfg.max_new_tokens, [c.step for _, c in todo], self.batch_size)
                fresh = self.judge_responses([int(idx[j]) for j, _ in todo],
                                             [g.response for g in gens])
                self._rescue(layer, idx, todo, fresh)
                it = iter(fresh)
                judged = [c.verdict if c.verdict is not None else next(it) for _, c in flat]
                per: dict[int, list[dict]] = {}
                for (j, _), rec in zip(flat, judged):
                    per.setdefault(j, []).append(rec)
                items = []
                for j in need:
                    recs = per[j]
                    win = next((r for r in recs if r["success"]), recs[0])
                    rec = {**win, "success": any(r["success"] for r in recs),
                           "nonrefusal": any(r["nonrefusal"] for r in recs),
                           "candidates": len(recs), "eps": float(eps[j]), "layer": layer,
                           "family": family.name, "prompt_id": self.ps.prompts[int(idx[j])].id}
                    cached[j] = rec
                    items.append((ks[j], "latent", rec))
                self.store.put_many(items)
            if on_eval:
                on_eval(len(idx))
            return np.array([bool(c["success"]) for c in cached])

        ask.prefix = prefix  # type: ignore[attr-defined]
        return ask

    def checker(self, layer: int):
        """The mid-attack test a family may call: generate each row with its push at ``layer``
        and judge the response exactly as a finished attack's candidate is judged."""
        def check(rows: list[int], deltas: list) -> list[dict]:
            gens = generate_perturbed(self.ctx, layer, rows, deltas, self.cfg.max_new_tokens,
                                      batch_size=self.batch_size)
            return self.judge_responses(rows, [g.response for g in gens])
        return check

    def _rescue(self, layer: int, idx: np.ndarray, flat: list, judged: list[dict]) -> None:
        """Success at ε means some push inside the ε-ball elicits coherent compliance. A push
        that breaks the model into incoherent non-refusal says nothing about the pushes inside
        it, so those are tried too (δ scaled down); otherwise success would stop being monotone
        at the top of the range and ε* would read +∞ for prompts a smaller push elicits."""
        if self.cfg.success != "coherent":
            return
        pending = [k for k, r in enumerate(judged)
                   if r["nonrefusal"] and not r["success"] and flat[k][1].step is None]
        for scale in self.cfg.rescue_scales:
            if not pending:
                return
            rows = [int(idx[flat[k][0]]) for k in pending]
            gens = generate_perturbed(self.ctx, layer, rows,
                                      [flat[k][1].delta * scale for k in pending],
                                      self.cfg.max_new_tokens, batch_size=self.batch_size)
            again = self.judge_responses(rows, [g.response for g in gens])
            still = []
            for k, rec in zip(pending, again):
                if rec["success"]:
                    judged[k] = {**rec, "rescued_scale": scale}
                elif rec["nonrefusal"]:
                    still.append(k)  # incoherent again: try a smaller push
            pending = still
