"""The behavioural stage: greedy responses to harmful and harmless prompts, judged.

S(M)  = fraction of harmful prompts whose unperturbed response the judge calls ``refusal``.
O(M)  = fraction of harmless prompts the model refuses (over-refusal), per harmless set.

Each prompt's record (prompt, response, verdict) is committed to the run store after every
generation batch, keyed by model, generation settings, set and prompt id, so an interrupted
stage resumes where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field

from ..data.sets import DatasetInfo, PromptSet, load_prompt_set
from ..errors import UserError
from ..judges.base import JudgeError
from ..judges.spec import judge_spec
from ..metrics.stats import Estimate, estimate_mean
from ..models.generate import Generation, greedy_generate
from ..runs import keys
from ..runs.store import ResultStore
from .base import Stage, StageContext

S_DEF = "behavioural safety S: fraction of harmful prompts whose greedy response the judge labels refusal"
O_DEF = "over-refusal O: fraction of harmless prompts whose greedy response the judge labels refusal"


class BehaveConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    harmful: str = Field(
        "builtin:harmful:test", description="harmful prompt set (S): builtin:harmful[:train|:test], "
        "advbench, harmbench, jailbreakbench, xstest-unsafe, a .csv/.json/.jsonl file, or "
        "hf:OWNER/NAME[:SPLIT]")
    harmless: list[str] = Field(
        default_factory=lambda: ["builtin:harmless:test", "builtin:borderline:test"],
        description="harmless prompt sets (over-refusal)")
    max_new_tokens: int = Field(32, gt=0, le=4096, description="greedy tokens per response (the "
                                "judge reads the opening sentences: benchmarks/bench_eval_tokens.py)")
    system: str | None = Field(None, description="system prompt (default: the chat template's own)")
    prompt_col: str | None = Field(None, description="prompt column of local/hub files")


class BehaveSummary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    judge: dict[str, Any]
    other_judges: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="judge spec → its agreement with this stage's judge "
        "(raw agreement and Cohen's kappa, bootstrap CIs) on the same stored responses, for every "
        "other judge that judged them in this run folder")
    max_new_tokens: int
    system_prompt: str | None
    harmful: DatasetInfo
    harmless: list[DatasetInfo]
    S: Estimate = Field(description="behavioural safety: fraction of harmful prompts refused")
    over_refusal: dict[str, Estimate] = Field(
        description="fraction of harmless prompts refused, per harmless set")
    over_refusal_all: Estimate | None = Field(
        default=None, description="over-refusal pooled over every harmless set")
    records: int = Field(description="per-prompt records in the store for this stage")
    store_prefixes: dict[str, str] = Field(
        default_factory=dict, description="prompt set → the run-store key prefix of its records")
    wall_time_s: float


@dataclass(frozen=True)
class GenSettings:
    max_new_tokens: int = 32
    batch_size: int = 32
    system: str | None = None

    def key(self, model_key: str, judge_desc: dict) -> str:
        """The hash of the judged records: the generation settings and the judge."""
        return keys.settings_hash({"model": model_key, "max_new_tokens": self.max_new_tokens,
                                   "system": self.system, "judge": judge_desc})

    def generation_key(self, model_key: str) -> str:
        """The hash of the responses alone (no judge)."""
        return keys.settings_hash({"model": model_key, "max_new_tokens": self.max_new_tokens,
                                   "system": self.system})


def _check_ids(ps: PromptSet) -> None:
    seen = set()
    for p in ps.prompts:
        if p.id in seen:
            raise UserError(f"prompt set '{ps.name}' has duplicate id '{p.id}'")
        seen.add(p.id)


def records_prefix(model_key: str, set_name: str, judge, settings: GenSettings) -> str:
    """Where the judged responses of one model to one prompt set live in the store."""
    return keys.behave_prefix(model_key, settings.key(model_key, judge.describe()), set_name)


def _verdict_fields(v) -> dict:
    """A verdict as stored: label, score, reason, and its provenance where it has any (the
    member of a composite judge that decided; a judge model's raw answer)."""
    out = {"verdict": v.label, "score": v.score, "reason": v.reason}
    if v.judge:
        out["verdict_judge"] = v.judge
    if v.raw is not None:
        out["judge_raw"] = v.raw
    return out


def behave_records(
    lm,
    store: ResultStore,
    model_key: str,
    ps: PromptSet,
    role: str,
    judge,
    settings: GenSettings,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """Generate and judge every prompt of ``ps`` not yet in the store; return all records in
    the order of ``ps``. A response is stored before it is judged, so a judge that fails (or
    another judge later) re-judges it without generating it again."""
    _check_ids(ps)
    prefix = records_prefix(model_key, ps.name, judge, settings)
    gprefix = keys.generation_prefix(model_key, settings.generation_key(model_key), ps.name)
    done = store.keys_with_prefix(prefix)
    todo = [p for p in ps.prompts if prefix + p.id not in done]
    if progress and len(ps) - len(todo):
        progress(len(ps) - len(todo))
    generated = store.keys_with_prefix(gprefix)
    stored = [p for p in todo if gprefix + p.id in generated]
    fresh = [p for p in todo if gprefix + p.id not in generated]

    tag = {"generation": settings.generation_key(model_key), "judge": judge_spec(judge.describe())}

    def judge_and_store(prompts: list, gens: list[dict]) -> None:
        try:
            verdicts = judge.judge([p.text for p in prompts], [g["response"] for g in gens])
        except JudgeError as e:  # keep the rows that were judged before the error goes up
            verdicts = getattr(e, "partial", None) or []
            _put_judged(store, prefix, ps, role, prompts, gens, verdicts, tag)
            raise
        _put_judged(store, prefix, ps, role, prompts, gens, verdicts, tag)
        if progress:
            progress(len(prompts))

    for i in range(0, len(stored), settings.batch_size):
        chunk = stored[i:i + settings.batch_size]
        judge_and_store(chunk, [store.get(gprefix + p.id) for p in chunk])

    def commit(idx: list[int], gens: list[Generation]) -> None:
        prompts = [fresh[i] for i in idx]
        rows = [{"prompt_id": p.id, "response": g.response, "n_new_tokens": g.n_new_tokens}
                for p, g in zip(prompts, gens)]
        store.put_many((gprefix + p.id, "behave", r) for p, r in zip(prompts, rows))
        judge_and_store(prompts, rows)

    if fresh:
        greedy_generate(lm, [p.text for p in fresh], settings.max_new_tokens,
                        settings.batch_size, settings.system, on_batch=commit)
    records = [store.get(prefix + p.id) for p in ps.prompts]
    assert all(r is not None for r in records)
    return records  # type: ignore[return-value]


def _put_judged(store: ResultStore, prefix: str, ps: PromptSet, role: str, prompts: list,
                gens: list[dict], verdicts: list, tag: dict) -> None:
    store.put_many(
        (prefix + p.id, "behave", {
            "set": ps.name, "role": role, "prompt_id": p.id, "prompt": p.text,
            "category": p.category, "response": g["response"], "n_new_tokens": g["n_new_tokens"],
            **_verdict_fields(v), **tag})
        for p, g, v in zip(prompts, gens, verdicts) if v is not None)


def other_judges(store: ResultStore, model_key: str, settings: GenSettings, judge,
                 results: dict[str, list[dict]], seed: int = 0) -> dict[str, dict[str, Any]]:
    """Every other judge that judged these same stored responses in this folder (another
    ``--judge`` run earlier): its raw agreement and kappa with this judge, on the rows both
    judged, all sets pooled."""
    from ..judges.agreement import pair_metrics

    gen, mine = settings.generation_key(model_key), judge_spec(judge.describe())
    ours = {(r["set"], r["prompt_id"]): r["verdict"] for recs in results.values() for r in recs}
    theirs: dict[str, dict[tuple, str]] = {}
    for _, r in store.items(keys.model_prefix("behave", model_key)):
        if r.get("generation") == gen and r.get("judge") not in (None, mine):
            row = (r.get("set"), r.get("prompt_id"))
            if row in ours:
                theirs.setdefault(r["judge"], {})[row] = r["verdict"]
    out = {}
    for spec, verdicts in sorted(theirs.items()):
        rows = sorted(verdicts)
        m = pair_metrics([ours[k] for k in rows], [verdicts[k] for k in rows], (mine, spec),
                         seed=seed)
        out[spec] = {"n": m.n, "agreement": m.metric("agreement"), "kappa": m.metric("kappa")}
    return out


def refusal_flags(records: list[dict]) -> list[float]:
    return [1.0 if r["verdict"] == "refusal" else 0.0 for r in records]


def run_behave(
    lm,
    store: ResultStore,
    model_key: str,
    harmful: PromptSet,
    harmless: list[PromptSet],
    judge,
    settings: GenSettings,
    seed: int = 0,
    progress_factory=None,
) -> BehaveSummary:
    t0 = time.time()
    sets = [(harmful, "harmful")] + [(h, "harmless") for h in harmless]
    names = [s.name for s, _ in sets]
    if len(set(names)) != len(names):
        raise UserError(f"prompt sets must have distinct names, got {names}")
    results: dict[str, list[dict]] = {}
    for ps, role in sets:
        if progress_factory is not None:
            with progress_factory(f"behave {ps.name}", len(ps)) as advance:
                results[ps.name] = behave_records(lm, store, model_key, ps, role, judge, settings, advance)
        else:
            results[ps.name] = behave_records(lm, store, model_key, ps, role, judge, settings)
    S = estimate_mean(refusal_flags(results[harmful.name]), S_DEF, seed=seed)
    over = {h.name: estimate_mean(refusal_flags(results[h.name]), O_DEF + f" ({h.name})", seed=seed)
            for h in harmless}
    pooled = [f for h in harmless for f in refusal_flags(results[h.name])]
    return BehaveSummary(
        judge=judge.describe(),
        other_judges=other_judges(store, model_key, settings, judge, results, seed),
        max_new_tokens=settings.max_new_tokens,
        system_prompt=settings.system,
        harmful=DatasetInfo(**harmful.describe()),
        harmless=[DatasetInfo(**h.describe()) for h in harmless],
        S=S,
        over_refusal=over,
        over_refusal_all=estimate_mean(pooled, O_DEF + " (all harmless sets pooled)", seed=seed)
        if harmless else None,
        records=sum(len(v) for v in results.values()),
        store_prefixes={ps.name: records_prefix(model_key, ps.name, judge, settings)
                        for ps, _ in sets},
        wall_time_s=round(time.time() - t0, 2),
    )


class BehaveStage(Stage):
    name = "behave"
    section = "behave"

    def check(self, cfg) -> None:
        load_sets(cfg)  # a set that cannot load fails before the model does

    def summary_fields(self, cfg) -> list[str]:
        return ["behave"]

    def run(self, ctx: StageContext, cfg: BehaveConfig) -> None:
        harmful, harmless = load_sets(ctx.cfg)
        ctx.record("behave", run_behave(ctx.lm, ctx.store, ctx.model_key, harmful, harmless,
                                        ctx.judge, GenSettings(cfg.max_new_tokens,
                                                               ctx.cfg.batch_size, cfg.system),
                                        seed=ctx.seed,
                                        progress_factory=ctx.progress))


def load_sets(cfg) -> tuple[PromptSet, list[PromptSet]]:
    """The behavioural stage's harmful set and harmless sets, as configured."""
    b = cfg.behave
    harmful = load_prompt_set(b.harmful, cfg.data_dir, b.prompt_col, cfg.limit)
    harmless = [load_prompt_set(h, cfg.data_dir, b.prompt_col, cfg.limit) for h in b.harmless]
    return harmful, harmless
