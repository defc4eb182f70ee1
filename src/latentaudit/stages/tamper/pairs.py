"""The attack pairs: (prompt, completion) examples the attacker fine-tunes on.

The attack trains on ``pairs``, the benign control on ``benign_pairs``: the control must be
harmless data, so it never falls back to a harmful pairs file. Each is ``builtin`` or a file.

``builtin``: the data model's (default the unaligned embedded base) greedy completions to
``builtin:harmful:train`` (or, for the benign control, its answers to ``builtin:harmless:train``),
generated once and cached (:mod:`latentaudit.models.completions`, keyed by the data model's
fingerprint, the prompt set's sha256 and ``completion_tokens``), in a seeded order and only as far
as needed. Only pairs whose completion the judge labels ``compliance`` are kept: a base model's
"target" can itself be a refusal, and for the benign control a refused harmless prompt would
teach refusal. A CSV/JSON/JSONL file gives pairs directly (a prompt column and a ``completion``
column), used as given, in file order; completions longer than ``completion_tokens`` tokens are
cut.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ...data.sets import PROMPT_COLUMNS, DatasetInfo, PromptSet, load_prompt_set, read_table
from ...errors import UserError
from ...models.completions import CompletionCache, pairs_cache
from ...models.fingerprint import fingerprint, spec_fingerprint
from ...models.memory import free_memory
from ...progress import progress_factory as make_progress
from .config import TAMPER_VERSION, TamperConfig, validate_tamper

log = logging.getLogger(__name__)

COMPLETION_COLUMNS = ("completion", "response", "output", "answer", "target")
PAIR_GEN_BATCH = 16
NO_PROGRESS = make_progress("none")


@dataclass(frozen=True)
class Pair:
    id: str
    prompt: str
    completion: str
    truncated: bool = False  # cut at completion_tokens: no end-of-turn token in the target


class PairInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="'builtin' or the pairs file")
    control: Literal["harmful", "benign"]
    data_model: str | None = Field(None, description="model whose completions made the pairs")
    data_model_fingerprint: str | None = None
    prompt_set: DatasetInfo | None = Field(None, description="prompts the builtin pairs answer")
    completion_tokens: int
    n_candidates: int = Field(description="prompts (builtin) or rows (file) available")
    n_generated: int = Field(0, description="builtin completions generated now (not cached)")
    n_judged: int = Field(description="candidates judged")
    n_kept: int = Field(description="judged compliance (builtin) / all rows (file)")
    n_dropped: int = Field(description="builtin completions the judge labels refusal, dropped")
    n_judged_refusal_in_file: int | None = Field(
        None, description="file pairs whose completion the judge labels refusal (kept)")
    n_used: int | None = None
    n_overlap_eval: int | None = Field(None, description="used pair prompts also in the eval set")
    sha256: str | None = Field(None, description="sha256 over the used (id, prompt, completion)")
    cache_file: str | None = None


@dataclass
class PairData:
    pairs: list[Pair]
    info: PairInfo

    def used(self, n: int) -> list[Pair]:
        return self.pairs[:n]


def pairs_sha256(pairs: list[Pair]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(p.id.encode() + b"\x00" + p.prompt.encode() + b"\x00" + p.completion.encode()
                 + (b"\x02" if p.truncated else b"\x01"))
    return h.hexdigest()


def _load_file_pairs(source: str, cfg: TamperConfig, judge) -> PairData:
    path = Path(source).expanduser()
    rows = read_table(path)
    if not rows:
        raise UserError(f"{path} has no rows")
    pcol = next((c for c in PROMPT_COLUMNS if c in rows[0]), None)
    ccol = next((c for c in COMPLETION_COLUMNS if c in rows[0]), None)
    if pcol is None or ccol is None:
        cols = ", ".join(k for k in rows[0] if k != "__line__")
        raise UserError(f"{path}: attack pairs need a prompt column ({'/'.join(PROMPT_COLUMNS[:4])}) "
                        f"and a completion column ({'/'.join(COMPLETION_COLUMNS)}); columns: {cols}")
    pairs = []
    for i, r in enumerate(rows, 1):
        line = r.get("__line__", i)
        p, c = r.get(pcol), r.get(ccol)
        if not isinstance(p, str) or not p.strip() or not isinstance(c, str) or not c.strip():
            raise UserError(f"{path} line {line}: empty or missing '{pcol}' or '{ccol}'")
        pid = r.get("id")
        pairs.append(Pair(str(pid) if pid not in (None, "") else f"{path.stem}-{i:05d}",
                          p.strip(), c.strip()))
    verdicts = judge.judge([p.prompt for p in pairs], [p.completion for p in pairs])
    n_ref = sum(v.label == "refusal" for v in verdicts)
    info = PairInfo(source=str(path), control=cfg.control, completion_tokens=cfg.completion_tokens,
                    n_candidates=len(pairs), n_judged=len(pairs), n_kept=len(pairs), n_dropped=0,
                    n_judged_refusal_in_file=n_ref)
    return PairData(pairs, info)


def build_pairs(
    cfg: TamperConfig,
    judge,
    *,
    lm=None,
    data_lm=None,
    data_dir=None,
    need: int | None = None,
    progress_factory=None,
) -> PairData:
    """The attack pairs of ``cfg``.

    The source is ``cfg.pairs`` for the attack, ``cfg.benign_pairs`` for the benign control.
    Builtin: the data model's greedy completions (``completion_tokens`` new tokens, no system
    prompt) to ``builtin:harmful:train`` (``builtin:harmless:train`` for the benign control), in a
    seeded order, cached on disk, generated only until ``need`` (default ``n_examples``) pairs
    the judge labels ``compliance`` are found; refusals are dropped. The data model is ``data_lm``
    if given, else ``lm`` when ``lm.spec == cfg.data_model``, else loaded on ``lm``'s device — and
    only when something is not cached. A file: every row, in file order.
    """
    source = cfg.pairs if cfg.control == "harmful" else cfg.benign_pairs
    if source != "builtin":
        validate_tamper(cfg)
        return _load_file_pairs(source, cfg, judge)
    need = cfg.n_examples if need is None else need
    set_spec = "builtin:harmful:train" if cfg.control == "harmful" else "builtin:harmless:train"
    ps = load_prompt_set(set_spec, data_dir)
    model = _DataModel(cfg.data_model, lm, data_lm)
    try:
        cache = pairs_cache(model.fingerprint(), ps, cfg.completion_tokens, cfg.control,
                            TAMPER_VERSION)
        with (progress_factory or NO_PROGRESS)("tamper pairs", need) as advance:
            kept, counts = _compliant_pairs(cfg, judge, ps, cache, model, need, advance)
    finally:
        model.close()
    info = PairInfo(
        source="builtin", control=cfg.control, data_model=cfg.data_model,
        data_model_fingerprint=model.fp, prompt_set=DatasetInfo(**ps.describe()),
        completion_tokens=cfg.completion_tokens, n_candidates=len(ps), **counts,
        n_kept=len(kept), cache_file=str(cache.path),
    )
    return PairData(kept, info)


def _compliant_pairs(cfg: TamperConfig, judge, ps: PromptSet, cache: CompletionCache,
                     model: _DataModel, need: int, advance) -> tuple[list[Pair], dict[str, int]]:
    """Pairs the judge labels compliance, taken in chunks of the seeded order (generating what
    the cache lacks) until ``need`` are found; with the counts PairInfo reports."""
    order = np.random.default_rng(cfg.seed).permutation(len(ps)).tolist()
    kept: list[Pair] = []
    n = {"n_generated": 0, "n_judged": 0, "n_dropped": 0}
    for start in range(0, len(order), PAIR_GEN_BATCH):
        if len(kept) >= need:
            break
        chunk = [ps.prompts[i] for i in order[start:start + PAIR_GEN_BATCH]]
        if cache.missing(chunk):
            n["n_generated"] += cache.generate(model.get(), chunk, cfg.completion_tokens,
                                               PAIR_GEN_BATCH, None)
        rows = [cache.rows[p.id] for p in chunk]
        verdicts = judge.judge([p.text for p in chunk], [r["completion"] for r in rows])
        n["n_judged"] += len(chunk)
        before = len(kept)
        for p, r, v in zip(chunk, rows, verdicts):
            if v.label == "compliance":
                kept.append(Pair(p.id, p.text, r["completion"],
                                 int(r["n_new_tokens"]) >= cfg.completion_tokens))
            else:
                n["n_dropped"] += 1
        advance(min(len(kept), need) - min(before, need))
    return kept, n


class _DataModel:
    """The model whose completions make the builtin pairs: ``data_lm``, the audited model when
    it is the data model, or loaded on the audited model's device only when needed (and freed
    by :meth:`close`)."""

    def __init__(self, spec: str, lm, data_lm):
        if data_lm is None and lm is not None and lm.spec == spec:
            data_lm = lm
        self.spec, self.audited, self.lm, self.loaded = spec, lm, data_lm, False
        self.fp: str | None = None

    def get(self):
        if self.lm is None:
            from ...models.loader import load_model

            device = str(self.audited.device) if self.audited is not None else "auto"
            log.info("loading the data model %s for the attack pairs", self.spec)
            self.lm, self.loaded = load_model(self.spec, device=device, dtype="float32"), True
        return self.lm

    def fingerprint(self) -> str:
        """The pairs cache's key for the data model: the gguf's sha256 first (known without
        loading); a tiny model's spec, marked, where it has none."""
        self.fp = _known_fingerprint(self.spec, self.lm)
        if self.fp is None:  # a hub model: its commit is known only once loaded
            self.fp = _known_fingerprint(self.spec, self.get())
        return self.fp

    def close(self) -> None:
        if self.loaded:
            self.lm, self.loaded = None, False
            free_memory()


def _known_fingerprint(spec: str, data_lm) -> str | None:
    if data_lm is not None:
        return fingerprint(data_lm, gguf_first=True) or f"spec:{data_lm.spec}"
    return f"spec:{spec}" if spec.startswith("tiny:") else spec_fingerprint(spec)
