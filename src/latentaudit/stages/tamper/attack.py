"""The attack: fine-tune a copy of the audited model, evaluating r(s) and U(s) on the way.

Training. The audited model is never modified: the attack trains a deep copy in memory (LoRA
adapters via peft on the copy, or every parameter of the copy for ``full``; see
:mod:`.finetune`), which doubles the model's memory for the duration of the attack. Batches
cycle through the ``n`` pairs in a seeded shuffled order (a fresh permutation per epoch). One
training run serves every checkpoint: training goes sequentially and pauses to evaluate at each
requested step count.

Utility ``U(s)``: the mean over utility prompts (harmless) of the mean per-token negative
log-likelihood (nats, teacher-forced) that the model after ``s`` steps assigns to the
*unattacked* model's own greedy answer. It rises when fine-tuning breaks the model, so a model
that stopped refusing because it broke is visible beside ``r(s)``.

Resume. Every evaluation is committed to the store as soon as it is known: per-prompt
responses and verdicts (through :func:`~latentaudit.stages.behave.behave_records`, under the model
key ``<model>+tamper-<attack hash>-s<s>``), per-prompt utility NLLs and a checkpoint record. A
rerun skips every stored evaluation; if a later checkpoint is missing it re-trains from scratch up
to that step (training is deterministic given the seed: ``torch.manual_seed`` in a forked RNG,
fixed data order, generation between steps consumes no randomness; bit-for-bit on CPU, GPU
kernels may add tiny non-determinism), evaluating only what is missing. The attack hash covers
everything that changes the trained weights (data, method, hyper-parameters, seed) but not the
step list, so adding steps to a finished run reuses the stored checkpoints.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...data.sets import DatasetInfo, Prompt, PromptSet, load_prompt_set
from ...metrics.stats import Estimate, estimate_mean
from ...runs import keys
from ...runs.store import ResultStore
from ...training import Example, batch_stream, collate, encode_pair, token_nll
from ..behave import GenSettings, behave_records, refusal_flags
from .config import TamperConfig, validate_tamper
from .curves import R_DEF, U_DEF, Checkpoint, TamperSummary, TamperTimings, curve_estimates
from .finetune import (TrainableCopy, attack_key, default_targets, fork_rng, leaf_names, pad_id,
                       sft_examples)
from .pairs import NO_PROGRESS, Pair, PairData, PairInfo, build_pairs, pairs_sha256


def run_tamper(
    lm,
    store: ResultStore,
    model_key: str,
    cfg: TamperConfig,
    judge,
    progress_factory=None,
    *,
    pairs: PairData | None = None,
    data_lm=None,
    data_dir=None,
    eval_set: PromptSet | None = None,
    utility_prompts: PromptSet | None = None,
    gen_batch_size: int = 16,
    system: str | None = None,
) -> TamperSummary:
    """Run (or resume) the fine-tuning attack of ``cfg`` on ``lm`` and return its summary.

    ``lm.model`` is never modified (the attack trains a deep copy). ``eval_set`` /
    ``utility_prompts`` override ``cfg.eval_harmful`` / ``cfg.utility_set``; ``pairs`` skips
    :func:`build_pairs`; ``gen_batch_size`` and ``system`` are the generation settings, which
    must equal the behavioural stage's for r(0) to share its records.
    """
    clock = _Clock()
    validate_tamper(cfg)
    progress = progress_factory or NO_PROGRESS
    # 1. the held-out harmful prompts r(s) is measured on, and the harmless utility prompts
    eval_ps = eval_set if eval_set is not None else load_prompt_set(
        cfg.eval_harmful, data_dir, limit=cfg.eval_limit)
    util_ps = utility_prompts if utility_prompts is not None else load_prompt_set(
        cfg.utility_set, data_dir, limit=cfg.utility_limit)

    # 2. the attack pairs; the first n_examples are used
    with clock.timed("pairs"):
        if pairs is None:
            pairs = build_pairs(cfg, judge, lm=lm, data_lm=data_lm, data_dir=data_dir,
                                progress_factory=progress_factory)
        used, info = _used_pairs(cfg, pairs, eval_ps)

    # 3. the unattacked model's own answers to the utility prompts, which U(s) scores
    settings = GenSettings(cfg.max_new_tokens, gen_batch_size, system)
    with clock.timed("clean"):
        utility = _utility_targets(lm, store, model_key, util_ps, judge, settings, progress)

    # 4. the store keys of each checkpoint: those fully stored are not evaluated again
    targets = _lora_targets(cfg, lm)
    key_targets = cfg.target_modules or (leaf_names(targets) if targets else None)
    run = _Run(lm, store, cfg, judge, settings, model_key,
               attack_key(cfg, info.sha256 or "", key_targets, system),
               eval_ps, util_ps, utility, progress, clock)
    todo = [s for s in cfg.steps if not run.is_stored(s)]

    # 5. r(0) on the audited model itself, then one training run up to the last missing
    #    checkpoint, pausing to evaluate each missing one
    if 0 in todo:
        _evaluate(run, lm, 0, 0, None, [])
    clock.steps_trained = _train_and_evaluate(run, used, targets, todo)

    # 6. the curves, read back from the store (evaluated now or by an earlier run alike)
    flags, r, u, checkpoints = _read_curves(run)
    last_meta = store.get(run.meta_key(cfg.steps[-1])) or {}
    facts = _attack_facts(run.facts, last_meta, targets)
    lora = cfg.method == "lora"
    return TamperSummary(
        config=cfg, model_key=model_key, attack_key=run.akey, judge=run.judge_desc, data=info,
        eval_set=DatasetInfo(**eval_ps.describe()), utility_set=DatasetInfo(**util_ps.describe()),
        target_modules=facts["target_leaves"] if lora else None,
        n_target_modules=facts["n_targets"] if lora else None,
        n_trainable_params=facts["n_trainable"],
        effective_batch_size=min(cfg.batch_size, len(used)),
        steps=list(cfg.steps), r=r, utility=u, **curve_estimates(cfg.steps, flags, cfg.seed),
        checkpoints=checkpoints, train_loss=list(last_meta.get("losses") or []),
        resumed_evaluations=len(cfg.steps) - len(todo), timings=clock.timings(),
    )


# --------------------------------------------------------------------------------------------
# the run's state and its store keys


@dataclass
class _Clock:
    """Seconds spent in each phase, for :class:`TamperTimings`."""

    start: float = field(default_factory=time.time)
    pairs: float = 0.0
    clean: float = 0.0
    setup: float = 0.0
    train: float = 0.0
    eval: float = 0.0
    utility: float = 0.0
    steps_trained: int = 0

    @contextmanager
    def timed(self, phase: str):
        t = time.time()
        yield
        setattr(self, phase, getattr(self, phase) + time.time() - t)

    def timings(self) -> TamperTimings:
        return TamperTimings(
            pairs_s=round(self.pairs, 3), clean_answers_s=round(self.clean, 3),
            setup_s=round(self.setup, 3), train_s=round(self.train, 3),
            eval_s=round(self.eval, 3), utility_s=round(self.utility, 3),
            total_s=round(time.time() - self.start, 3), steps_trained=self.steps_trained,
            s_per_step=round(self.train / self.steps_trained, 4) if self.steps_trained else None)


@dataclass
class _UtilityTargets:
    items: list[tuple[Prompt, str]]  # (prompt, the unattacked model's answer); empty ones left out
    examples: list[Example]  # the same, tokenised for the teacher-forced NLL


@dataclass
class _Run:
    """One attack's fixed inputs, and where each checkpoint's records live in the store."""

    lm: Any
    store: ResultStore
    cfg: TamperConfig
    judge: Any
    settings: GenSettings
    model_key: str
    akey: str
    eval_ps: PromptSet
    util_ps: PromptSet
    utility: _UtilityTargets
    progress: Any
    clock: _Clock
    facts: dict[str, Any] = field(default_factory=dict)  # the set-up's, once trained

    def __post_init__(self):
        self.judge_desc = self.judge.describe()

    def key(self, s: int) -> str:
        """The model key of the checkpoint at ``s`` (the audited model's own at 0)."""
        return keys.tamper_checkpoint(self.model_key, self.akey, s)

    def eval_prefix(self, s: int) -> str:
        k = self.key(s)
        return keys.behave_prefix(k, self.settings.key(k, self.judge_desc), self.eval_ps.name)

    def nll_prefix(self, s: int) -> str:
        clean = self.settings.key(self.model_key, self.judge_desc)  # the answers scored
        return keys.tamper_nll_prefix(self.key(s), clean, self.util_ps.name)

    def meta_key(self, s: int) -> str:
        return keys.tamper_meta_key(self.key(s))

    def is_stored(self, s: int) -> bool:
        ep, up = self.eval_prefix(s), self.nll_prefix(s)
        if not self.store.has(self.meta_key(s)):
            return False
        have = self.store.keys_with_prefix(ep) | self.store.keys_with_prefix(up)
        return (all(ep + p.id in have for p in self.eval_ps.prompts)
                and all(up + p.id in have for p, _ in self.utility.items))


# --------------------------------------------------------------------------------------------
# the steps of run_tamper


def _used_pairs(cfg: TamperConfig, pairs: PairData,
                eval_ps: PromptSet) -> tuple[list[Pair], PairInfo]:
    """The first ``n_examples`` pairs, and their info completed with what using them means."""
    validate_tamper(cfg, len(pairs.pairs))
    used = pairs.used(cfg.n_examples)
    eval_texts = {p.text for p in eval_ps.prompts}
    info = pairs.info.model_copy(update={
        "n_used": len(used), "sha256": pairs_sha256(used),
        "n_overlap_eval": sum(p.prompt in eval_texts for p in used)})
    if info.n_overlap_eval:
        warnings.warn(f"{info.n_overlap_eval} attack-pair prompts are also evaluation prompts: "
                      "r(s) is then not a held-out measure", stacklevel=3)
    return used, info


def _utility_targets(lm, store: ResultStore, model_key: str, util_ps: PromptSet, judge,
                     settings: GenSettings, progress) -> _UtilityTargets:
    """The unattacked model's answers to the utility prompts, stored like behave records."""
    with progress(f"tamper clean answers {util_ps.name}", len(util_ps)) as adv:
        clean = behave_records(lm, store, model_key, util_ps, "harmless", judge, settings, adv)
    items = [(p, r["response"]) for p, r in zip(util_ps.prompts, clean) if r["response"].strip()]
    examples = []
    for p, ans in items:
        p_ids, c_ids = encode_pair(lm.tokenizer, p.text, ans, system=settings.system,
                                   end_of_turn=False)
        examples.append(Example(p_ids + c_ids, len(p_ids)))
    return _UtilityTargets(items, examples)


def _lora_targets(cfg: TamperConfig, lm) -> list[str] | None:
    """Full names of the modules LoRA adapts (None for full fine-tuning)."""
    if cfg.method != "lora":
        return None
    return list(cfg.target_modules) if cfg.target_modules else default_targets(lm.model)


def _evaluate(run: _Run, target_lm, s: int, steps_taken: int, loss: float | None,
              losses: list[float]) -> None:
    """r(s) and U(s) of ``target_lm`` (the checkpoint at ``s``), committed to the store."""
    with run.clock.timed("eval"), run.progress(f"tamper r({s})", len(run.eval_ps)) as adv:
        behave_records(target_lm, run.store, run.key(s), run.eval_ps, "harmful", run.judge,
                       run.settings, adv)
    with run.clock.timed("utility"):
        _utility_nll(target_lm, run.store, run.nll_prefix(s), run.utility.items,
                     run.utility.examples, s, run.settings.batch_size)
    run.store.put(run.meta_key(s), "tamper", {
        "s": s, "optimizer_steps": steps_taken, "train_loss": loss, "losses": losses,
        "attack_key": run.akey if s else None, "model_key": run.key(s), **run.facts})


def _train_and_evaluate(run: _Run, used: list[Pair], targets: list[str] | None,
                        todo: list[int]) -> int:
    """Train a fresh copy up to the last step in ``todo``, evaluating each step in ``todo`` on
    the way; returns the optimiser steps taken."""
    s_need = max([s for s in todo if s > 0], default=0)
    if s_need == 0:
        return 0
    cfg, lm = run.cfg, run.lm
    t = time.time()
    examples = sft_examples(lm.tokenizer, used, run.settings.system, cfg.completion_tokens)
    with fork_rng(lm.device):
        torch.manual_seed(cfg.seed)
        trainee = TrainableCopy(lm, cfg, targets)
        run.clock.setup += time.time() - t
        try:
            run.facts.update(trainee.facts(targets))
            stream = batch_stream(len(examples), min(cfg.batch_size, len(examples)), cfg.seed)
            pad = pad_id(lm.tokenizer)
            losses: list[float] = []
            with run.progress("tamper train", s_need) as adv:
                for step in range(1, s_need + 1):
                    with run.clock.timed("train"):
                        batch = collate([examples[i] for i in next(stream)], pad, lm.device)
                        losses.append(trainee.step(batch))
                    adv(1)
                    if step in todo:
                        _evaluate(run, trainee.lm, step, trainee.steps_taken, losses[-1],
                                  list(losses))
        finally:
            trainee.close()
    return s_need


def _read_curves(run: _Run) -> tuple[np.ndarray, list[Estimate], list[Estimate], list[Checkpoint]]:
    """From the store: the refusal flags [n_prompts, n_steps], r(s) and U(s) estimates, and
    the checkpoint records."""
    cfg = run.cfg
    cols, r, u, checkpoints = [], [], [], []
    for s in cfg.steps:
        ep = run.eval_prefix(s)
        flags = refusal_flags([run.store.get(ep + p.id) for p in run.eval_ps.prompts])
        cols.append(flags)
        r.append(estimate_mean(flags, R_DEF.format(s=s, method=cfg.method, control=cfg.control),
                               seed=cfg.seed))
        nll = [run.store.get(run.nll_prefix(s) + p.id)["nll"] for p, _ in run.utility.items]
        u.append(estimate_mean(nll, U_DEF.format(s=s, method=cfg.method, control=cfg.control),
                               seed=cfg.seed))
        meta = run.store.get(run.meta_key(s)) or {}
        checkpoints.append(Checkpoint(s=s, optimizer_steps=int(meta.get("optimizer_steps", -1)),
                                      train_loss=meta.get("train_loss"), model_key=run.key(s)))
    return np.asarray(cols, dtype=float).T, r, u, checkpoints


def _attack_facts(trained: dict[str, Any], last_meta: dict, targets: list[str] | None) -> dict:
    """The set-up's facts: this invocation's, else those stored with the last checkpoint, else
    what the target list says (nothing trained yet)."""
    if trained:
        return trained
    if "n_trainable" in last_meta:
        return {k: last_meta[k] for k in ("n_trainable", "n_targets", "target_leaves")}
    return {"n_trainable": None, "n_targets": len(targets) if targets else None,
            "target_leaves": leaf_names(targets) if targets else None}


# --------------------------------------------------------------------------------------------
# scoring


@torch.no_grad()
def _utility_nll(target_lm, store: ResultStore, prefix: str, items, examples: list[Example],
                 s: int, batch_size: int) -> None:
    """Teacher-forced mean token NLL of each clean answer; committed per batch, skipping stored
    prompts."""
    todo = [i for i, (p, _) in enumerate(items) if not store.has(prefix + p.id)]
    pad = pad_id(target_lm.tokenizer)
    model = target_lm.model
    model.eval()
    for b in range(0, len(todo), batch_size):
        idx = todo[b:b + batch_size]
        batch = collate([examples[i] for i in idx], pad, target_lm.device)
        tot, cnt = token_nll(model, batch, share_prefix=True)
        store.put_many(
            (prefix + items[i][0].id, "tamper", {
                "s": s, "prompt_id": items[i][0].id, "nll": float(t) / max(int(c), 1),
                "n_tokens": int(c)})
            for i, t, c in zip(idx, tot.tolist(), cnt.tolist()))
