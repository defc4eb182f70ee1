"""The behavioural stage on a tiny model: records, metrics, resume after interruption."""

from __future__ import annotations

import pytest

from latentaudit.data.sets import Prompt, PromptSet
from latentaudit.judges.base import Judge, Verdict
from latentaudit.models import generate as gen_mod
from latentaudit.runs.store import ResultStore
from latentaudit.stages import behave as behave_mod
from latentaudit.stages.behave import GenSettings, behave_records, run_behave


class EveryOtherJudge(Judge):
    """Refusal on prompts whose id ends in an even digit: a known truth for the metrics."""

    name = "test-even"

    def judge(self, prompts, responses):
        return [Verdict("refusal" if int(p.split()[-1]) % 2 == 0 else "compliance",
                        1.0 if int(p.split()[-1]) % 2 == 0 else 0.0, "test") for p in prompts]

    def describe(self):
        return {"name": self.name}


def _set(name, n):
    return PromptSet(name, [Prompt(f"{name}-{i}", f"please answer question {i}") for i in range(n)],
                     "test")


def test_behave_metrics_and_records(tiny_lm, tmp_path):
    store = ResultStore(tmp_path / "s.sqlite")
    harmful, harmless = _set("harm", 10), _set("ok", 6)
    summ = run_behave(tiny_lm, store, "tiny", harmful, [harmless], EveryOtherJudge(),
                      GenSettings(max_new_tokens=4, batch_size=4))
    assert summ.S.value == pytest.approx(0.5) and summ.S.n == 10
    assert summ.over_refusal["ok"].value == pytest.approx(0.5) and summ.over_refusal["ok"].n == 6
    assert summ.S.lo <= summ.S.value <= summ.S.hi
    assert summ.records == 16 == store.count("behave/")
    rec = next(v for _, v in store.items("behave/"))
    assert {"prompt", "response", "verdict", "score", "set", "role"} <= set(rec)


def test_resume_after_interruption(tiny_lm, tmp_path, monkeypatch):
    store = ResultStore(tmp_path / "s.sqlite")
    ps = _set("harm", 10)
    settings = GenSettings(max_new_tokens=4, batch_size=3)
    calls = {"batches": 0}
    real = gen_mod.greedy_generate

    def crashing(lm, prompts, *a, on_batch=None, **k):
        def cb(idx, gens):
            on_batch(idx, gens)
            calls["batches"] += 1
            if calls["batches"] == 2:
                raise KeyboardInterrupt  # killed after two committed batches
        return real(lm, prompts, *a, on_batch=cb, **k)

    monkeypatch.setattr(behave_mod, "greedy_generate", crashing)
    with pytest.raises(KeyboardInterrupt):
        behave_records(tiny_lm, store, "tiny", ps, "harmful", EveryOtherJudge(), settings)
    assert store.count("behave/") == 6  # two batches of three, committed

    seen = []

    def counting(lm, prompts, *a, **k):
        seen.extend(prompts)
        return real(lm, prompts, *a, **k)

    monkeypatch.setattr(behave_mod, "greedy_generate", counting)
    recs = behave_records(tiny_lm, store, "tiny", ps, "harmful", EveryOtherJudge(), settings)
    assert len(seen) == 4  # only the unfinished prompts were generated again
    assert store.count("behave/") == 10 and [r["prompt_id"] for r in recs] == [p.id for p in ps.prompts]

    # the resumed records equal an uninterrupted run's
    fresh = ResultStore(tmp_path / "fresh.sqlite")
    monkeypatch.setattr(behave_mod, "greedy_generate", real)
    clean = behave_records(tiny_lm, fresh, "tiny", ps, "harmful", EveryOtherJudge(), settings)
    assert [r["response"] for r in clean] == [r["response"] for r in recs]

    # a rerun of a finished stage generates nothing
    seen.clear()
    monkeypatch.setattr(behave_mod, "greedy_generate", counting)
    behave_records(tiny_lm, store, "tiny", ps, "harmful", EveryOtherJudge(), settings)
    assert seen == []


def test_duplicate_ids_rejected(tiny_lm, tmp_path):
    from latentaudit.errors import UserError

    ps = PromptSet("d", [Prompt("a", "x 1"), Prompt("a", "y 2")], "test")
    with pytest.raises(UserError, match="duplicate id"):
        behave_records(tiny_lm, ResultStore(tmp_path / "s.sqlite"), "tiny", ps, "harmful",
                       EveryOtherJudge(), GenSettings())


@pytest.mark.embedded
def test_embedded_model_is_mostly_unsafe(embedded_lm, tmp_path):
    """SmolLM2-135M-Instruct is unaligned: it complies with most harmful requests."""
    from latentaudit.data.sets import load_prompt_set
    from latentaudit.judges import SubstringJudge

    harmful = load_prompt_set("builtin:harmful:test", limit=20)
    summ = run_behave(embedded_lm, ResultStore(tmp_path / "s.sqlite"), "smol", harmful, [],
                      SubstringJudge(), GenSettings(max_new_tokens=48, batch_size=10))
    assert summ.S.n == 20
    assert summ.S.value < 0.5
