"""Judges composed (fallback, ensemble), the config's judge section, and stored responses
re-judged by another judge without being generated again."""

from __future__ import annotations

import pytest

from latentaudit import registry
from latentaudit.cli import main
from latentaudit.config import RunConfig, resolve_config
from latentaudit.data.sets import Prompt, PromptSet
from latentaudit.errors import UserError
from latentaudit.judges.base import Judge, JudgeError, Verdict
from latentaudit.judges.compose import EnsembleJudge, FallbackJudge, JudgeConfig, from_config
from latentaudit.judges.spec import make_judge
from latentaudit.runs.store import ResultStore
from latentaudit.stages import behave as behave_mod
from latentaudit.stages.behave import GenSettings, behave_records


class Fixed(Judge):
    """The same label for every row; counts the rows it was asked."""

    def __init__(self, label="refusal", tag="fixed"):
        self.label, self.tag, self.asked = label, tag, 0

    def judge(self, prompts, responses):
        self.asked += len(prompts)
        return [Verdict(self.label, 1.0 if self.label == "refusal" else 0.0, self.tag)
                for _ in prompts]

    def describe(self):
        return {"name": self.tag, "version": "1", "parameters": {"label": self.label}}


class Flaky(Fixed):
    """Cannot judge rows whose prompt holds 'odd': a server's unparsable answers."""

    def judge(self, prompts, responses):
        self.asked += len(prompts)
        partial = [None if "odd" in p else Verdict("refusal", 1.0, "flaky") for p in prompts]
        bad = [i for i, v in enumerate(partial) if v is None]
        if bad:
            e = JudgeError(f"{len(bad)} rows unparsable", rows=bad)
            e.partial = partial
            e.raw = {i: "garbled" for i in bad}
            raise e
        return partial


def test_fallback_fills_exactly_the_rows_the_primary_could_not_judge():
    j = FallbackJudge(Flaky(tag="flaky"), Fixed("compliance", "backup"))
    out = j.judge(["a", "odd b", "c", "odd d"], ["r"] * 4)
    assert [v.label for v in out] == ["refusal", "compliance", "refusal", "compliance"]
    assert [v.judge for v in out] == ["", "backup", "", "backup"]
    assert out[1].reason == "fallback:backup" and out[1].raw == "garbled"
    assert j.fallback.asked == 2
    d = j.describe()
    assert d["parameters"]["primary"]["name"] == "flaky"
    assert d["parameters"]["fallback"]["name"] == "backup"


@pytest.mark.parametrize("labels, rule, want", [
    (["refusal", "refusal", "compliance"], "majority", "refusal"),
    (["refusal", "compliance"], "majority", "compliance"),  # a tie never raises S
    (["refusal", "refusal", "compliance"], "all", "compliance"),
    (["refusal", "refusal"], "all", "refusal"),
])
def test_ensemble_rules(labels, rule, want):
    j = EnsembleJudge([Fixed(lab, f"j{i}") for i, lab in enumerate(labels)], rule)
    (v,) = j.judge(["p"], ["r"])
    assert v.label == want and (v.score >= 0.5) == (want == "refusal")
    assert v.reason.startswith(f"{rule} {labels.count('refusal')}/{len(labels)}")


def test_ensemble_needs_two_judges_and_a_known_rule():
    with pytest.raises(UserError, match="at least two"):
        EnsembleJudge([Fixed()])
    with pytest.raises(UserError, match="majority or all"):
        EnsembleJudge([Fixed(), Fixed()], "any")


def test_specs():
    assert make_judge("substring").name == "substring"
    with pytest.raises(UserError, match="unknown judge 'nope'"):
        make_judge("nope")
    with pytest.raises(UserError, match="needs a target"):
        make_judge("guard")
    with pytest.raises(UserError, match="takes no target"):
        make_judge("substring:x")
    j = from_config({"ensemble": ["substring", "substring"], "rule": "all", "fallback": "substring"})
    assert isinstance(j, FallbackJudge) and isinstance(j.primary, EnsembleJudge)


def test_config_judge_section_forms(tmp_path):
    assert RunConfig().judge.name == "substring"
    assert RunConfig.model_validate({"judge": "guard:/m"}).judge.name == "guard:/m"
    # the judge's old place still works
    assert RunConfig.model_validate({"behave": {"judge": "x"}}).judge.name == "x"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("judge: api:refusal\n")
    # a flag merges into a config's plain-string judge instead of replacing it
    r = resolve_config(str(cfg), {"judge.url": "http://127.0.0.1:1/v1"})
    assert r.judge.name == "api:refusal" and r.judge.url == "http://127.0.0.1:1/v1"
    cfg.write_text("judge: {name: substring, fallback: substring, rule: some}\n")
    with pytest.raises(UserError, match="judge.rule"):
        resolve_config(str(cfg), {})
    assert JudgeConfig(url="u", model="m").options().url == "u"


def _ps(n):
    return PromptSet("harm", [Prompt(f"h{i}", f"{'odd ' if i % 2 else ''}question {i}")
                              for i in range(n)], "test")


def test_another_judge_rejudges_stored_responses_without_generating(tiny_lm, tmp_path,
                                                                    monkeypatch):
    store = ResultStore(tmp_path / "s.sqlite")
    settings = GenSettings(max_new_tokens=4, batch_size=3)
    first = behave_records(tiny_lm, store, "tiny", _ps(6), "harmful", Fixed("refusal", "a"),
                           settings)
    monkeypatch.setattr(behave_mod, "greedy_generate",
                        lambda *a, **k: pytest.fail("generated again"))
    b = Fixed("compliance", "b")
    second = behave_records(tiny_lm, store, "tiny", _ps(6), "harmful", b, settings)
    assert [r["response"] for r in second] == [r["response"] for r in first]
    assert {r["verdict"] for r in first} == {"refusal"}
    assert {r["verdict"] for r in second} == {"compliance"} and b.asked == 6
    # each judge's verdicts stay its own: asking the first again reads its records
    again = behave_records(tiny_lm, store, "tiny", _ps(6), "harmful", Fixed("refusal", "a"),
                           settings)
    assert again == first


def test_a_judge_that_fails_mid_run_resumes_without_losing_or_reasking(tiny_lm, tmp_path):
    store = ResultStore(tmp_path / "s.sqlite")
    settings = GenSettings(max_new_tokens=4, batch_size=3)
    flaky = Flaky(tag="flaky")
    with pytest.raises(JudgeError):
        behave_records(tiny_lm, store, "tiny", _ps(6), "harmful", flaky, settings)
    # the first batch's responses are stored, and its rows that were judged (the odd ones
    # could not be)
    ids = [k.rsplit("/", 1)[1] for k, _ in store.items("gen/")]
    assert len(ids) == 3
    assert store.count("behave/") == sum(int(i[1:]) % 2 == 0 for i in ids)
    fb = FallbackJudge(Flaky(tag="flaky"), Fixed("compliance", "backup"))
    recs = behave_records(tiny_lm, store, "tiny", _ps(6), "harmful", fb, settings)
    assert [r["verdict"] for r in recs] == ["refusal", "compliance"] * 3
    assert [r.get("verdict_judge") for r in recs[:2]] == [None, "backup"]
    assert recs[1]["judge_raw"] == "garbled"


def test_run_with_a_judge_that_cannot_load_stops_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["behave", "--model", "tiny:llama", "--judge", f"guard:{tmp_path}/missing",
               "-o", str(out), "--limit", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and err.startswith("error:")
    assert not out.exists()
    rc = main(["behave", "--model", "tiny:llama", "--judge", "nope", "-o", str(out)])
    assert rc == 2 and "unknown judge 'nope'" in capsys.readouterr().err


def test_judges_are_listed_with_what_they_need(capsys):
    assert main(["ls", "judges"]) == 0
    text = capsys.readouterr().out
    for kind in ("substring", "classifier:TARGET", "guard:TARGET", "seqcls:TARGET", "api:TARGET"):
        assert kind in text
    assert registry.get("judge", "api").takes_target


def test_a_second_judge_on_the_same_responses_reports_its_agreement(tiny_lm, tmp_path):
    """behave with one judge, then others into the same store: each summary says how far it
    agrees with every other judge on the stored responses."""
    from latentaudit.stages.behave import run_behave

    store = ResultStore(tmp_path / "s.sqlite")
    settings = GenSettings(max_new_tokens=4, batch_size=3)
    first = run_behave(tiny_lm, store, "tiny", _ps(6), [], Fixed("refusal", "a"), settings)
    assert first.other_judges == {}
    second = run_behave(tiny_lm, store, "tiny", _ps(6), [], Fixed("compliance", "b"), settings)
    (spec, a), = second.other_judges.items()
    assert spec == "a" and a["n"] == 6 and a["agreement"]["value"] == 0.0
    third = run_behave(tiny_lm, store, "tiny", _ps(6), [], Fixed("refusal", "c"), settings)
    assert third.other_judges["a"]["agreement"]["value"] == 1.0
    assert third.other_judges["b"]["agreement"]["value"] == 0.0
