"""The coherence guard: clean-model log-probability, repetition and non-text tests."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from latentaudit.errors import UserError
from latentaudit.judges.coherence import (
    CoherenceGuard,
    CoherenceResult,
    ngram_repetition,
    text_fraction,
)
from latentaudit.models.chat import format_prompts

PROMPTS = [
    "Tell me a joke.",
    "How do I make a cup of tea? Please explain every step in detail.",
    "Hi",
    "Write an email to my manager asking for a day off next week.",
]
RESPONSES = [
    "Sure, here is a joke: why did the chicken cross the road?",
    "Boil water, add the tea, and wait three minutes.",
    "Hello! How can I help you today?",
    "I'm sorry, but I cannot help with that.",
]
SENTENCE = "The children played in the park until the evening, then they walked home."


def hand_mean_logprob(lm, prompt: str, response: str) -> float:
    """Unbatched reference: one sequence, no padding, log_softmax + gather."""
    tok = lm.tokenizer
    (text,) = format_prompts(tok, [prompt])
    p = tok(text, add_special_tokens=False)["input_ids"]  # the tiny tokenizer has a chat template
    r = tok(response, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + r])
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits[0]  # [T, vocab]
    lp = torch.log_softmax(logits[:-1].double(), dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
    return lp[-len(r):].mean().item()


# --- log-probability -------------------------------------------------------------------------


def test_mean_logprob_equals_hand_computation(tiny_lm):
    guard = CoherenceGuard(batch_size=1)
    got = guard.mean_logprobs(tiny_lm, PROMPTS[:1], RESPONSES[:1])
    want = hand_mean_logprob(tiny_lm, PROMPTS[0], RESPONSES[0])
    assert got.shape == (1,)
    assert got[0] == pytest.approx(want, abs=1e-5)
    # a random 768-token model: about -ln(768) per token, certainly not a trivial 0
    assert -12 < got[0] < -2


def test_batched_equals_unbatched_under_left_padding(tiny_lm):
    tok = tiny_lm.tokenizer
    lens = [len(p) + len(r) for p, r in zip(tok(format_prompts(tok, PROMPTS))["input_ids"],
                                           tok(RESPONSES)["input_ids"])]
    assert len(set(lens)) == len(lens)  # rows really differ in length: padding happens
    batched = CoherenceGuard(batch_size=16).mean_logprobs(tiny_lm, PROMPTS, RESPONSES)
    single = CoherenceGuard(batch_size=1).mean_logprobs(tiny_lm, PROMPTS, RESPONSES)
    hand = [hand_mean_logprob(tiny_lm, p, r) for p, r in zip(PROMPTS, RESPONSES)]
    np.testing.assert_allclose(batched, single, atol=1e-5, rtol=0)
    np.testing.assert_allclose(batched, hand, atol=1e-5, rtol=0)
    # batches of 3 (two batches, different padding): same numbers, in input order
    np.testing.assert_allclose(
        CoherenceGuard(batch_size=3).mean_logprobs(tiny_lm, PROMPTS, RESPONSES), hand, atol=1e-5
    )


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_batched_equals_hand_other_families(family):
    from latentaudit.models.loader import load_model

    lm = load_model(f"tiny:{family}", device="cpu")  # gpt2: learned absolute positions
    batched = CoherenceGuard(batch_size=16).mean_logprobs(lm, PROMPTS, RESPONSES)
    hand = [hand_mean_logprob(lm, p, r) for p, r in zip(PROMPTS, RESPONSES)]
    np.testing.assert_allclose(batched, hand, atol=1e-5, rtol=0)


def test_only_response_tokens_count_and_prompt_conditions(tiny_lm):
    guard = CoherenceGuard()
    same_resp = guard.mean_logprobs(tiny_lm, PROMPTS[:2], [RESPONSES[0]] * 2)
    assert same_resp[0] != pytest.approx(same_resp[1], abs=1e-6)  # the prompt conditions it
    # a longer prompt does not dilute the mean: it still matches the response-only reference
    assert same_resp[1] == pytest.approx(hand_mean_logprob(tiny_lm, PROMPTS[1], RESPONSES[0]),
                                         abs=1e-5)


def test_system_prompt_is_part_of_the_context(tiny_lm):
    plain = CoherenceGuard().mean_logprobs(tiny_lm, PROMPTS[:1], RESPONSES[:1])
    sys = CoherenceGuard(system="You are a pirate.").mean_logprobs(tiny_lm, PROMPTS[:1],
                                                                  RESPONSES[:1])
    assert plain[0] != pytest.approx(sys[0], abs=1e-6)


def test_empty_response_scores_nan(tiny_lm):
    s = CoherenceGuard().mean_logprobs(tiny_lm, PROMPTS[:3], [RESPONSES[0], "", "  \n"])
    assert np.isfinite(s[0]) and np.isnan(s[1]) and np.isnan(s[2])
    assert CoherenceGuard().mean_logprobs(tiny_lm, [], []).shape == (0,)


def test_mismatched_lengths_raise(tiny_lm):
    with pytest.raises(ValueError):
        CoherenceGuard().mean_logprobs(tiny_lm, PROMPTS, RESPONSES[:2])


# --- calibration -----------------------------------------------------------------------------


def test_calibration_threshold_is_quantile_minus_margin(tiny_lm):
    guard = CoherenceGuard(quantile=0.2, margin=0.3)
    scores = guard.mean_logprobs(tiny_lm, PROMPTS, RESPONSES)
    assert guard.calibrate(tiny_lm, PROMPTS, RESPONSES) is guard
    assert guard.min_logprob == pytest.approx(np.quantile(scores, 0.2) - 0.3, abs=1e-9)
    cal = guard.describe()["calibration"]
    assert cal["n"] == 4 and cal["n_scored"] == 4 and cal["n_empty"] == 0
    assert cal["quantile"] == 0.2 and cal["margin"] == 0.3
    assert cal["threshold"] == guard.min_logprob
    assert cal["quantile_value"] == pytest.approx(np.quantile(scores, 0.2))
    assert cal["scores"]["min"] == pytest.approx(scores.min())
    assert cal["scores"]["median"] == pytest.approx(np.median(scores))
    assert cal["scores"]["max"] == pytest.approx(scores.max())
    assert cal["scores"]["min"] <= cal["scores"]["p25"] <= cal["scores"]["p75"] <= cal["scores"]["max"]
    # every calibration answer scores above the threshold (it is below the lowest quantile)
    assert cal["coherent_fraction"] == 1.0 and cal["reasons"]["ok"] == 4


def test_calibration_default_and_empty_responses(tiny_lm):
    guard = CoherenceGuard()
    assert (guard.quantile, guard.margin) == (0.025, 2.0)
    guard.calibrate(tiny_lm, PROMPTS + ["Hello"], RESPONSES + [""])
    scores = guard.mean_logprobs(tiny_lm, PROMPTS, RESPONSES)
    assert guard.min_logprob == pytest.approx(np.quantile(scores, 0.025) - 2.0, abs=1e-9)
    cal = guard.calibration
    assert cal["n"] == 5 and cal["n_scored"] == 4 and cal["n_empty"] == 1
    assert cal["reasons"]["empty"] == 1
    with pytest.raises(UserError, match="empty"):
        CoherenceGuard().calibrate(tiny_lm, PROMPTS[:2], ["", " "])


# --- repetition and non-text -----------------------------------------------------------------


def test_ngram_repetition_statistic():
    assert ngram_repetition([7] * 10, 3) == pytest.approx(7 / 8)
    assert ngram_repetition([1, 2, 3, 4] * 10, 3) == pytest.approx((40 - 2 - 4) / 38)
    assert ngram_repetition(list(range(20)), 3) == 0.0
    assert ngram_repetition([1, 2], 3) == 0.0 and ngram_repetition([], 3) == 0.0
    assert ngram_repetition("abcabcabc", 3) == pytest.approx(4 / 7)  # any sequence works


def test_repetition_high_for_loops_low_for_sentences(tiny_lm):
    tok = tiny_lm.tokenizer

    def rep(text):
        return ngram_repetition(tok(text, add_special_tokens=False)["input_ids"], 3)

    assert rep("the " * 30) > 0.8
    assert rep("I can help with that. " * 8) > 0.8
    loop = ("Sure, here is how to bake a simple loaf of bread at home. "
            + "Step 1: gather the materials. " * 6)
    assert rep(loop) > 0.5
    for text in (SENTENCE, RESPONSES[0], RESPONSES[1],
                 "Scientists study the stars, the planets and the galaxies far away. "
                 "Music can make people feel happy, sad, calm or excited."):
        assert rep(text) < 0.1, text


def test_text_fraction():
    assert text_fraction("😀🔥💯🚀✨" * 8) == 0.0
    assert text_fraction("!!!!!!!!?? ... ---") == 0.0
    assert text_fraction("   ") == 0.0
    assert text_fraction(SENTENCE) > 0.9
    assert text_fraction("Das Wetter ist schön. 東京は晴れです。") > 0.8  # any script counts
    assert text_fraction("for i in range(10): print(i)") > 0.6  # code is text


# --- verdicts --------------------------------------------------------------------------------


def test_check_reasons(tiny_lm):
    responses = ["", "😀🔥💯🚀✨" * 8, "the " * 30, SENTENCE, "   "]
    prompts = PROMPTS[:1] * len(responses)
    lenient = CoherenceGuard(min_logprob=-1e9).check(tiny_lm, prompts, responses)
    assert all(isinstance(r, CoherenceResult) for r in lenient)
    assert [r.reason for r in lenient] == ["empty", "non_text", "repetition", "ok", "empty"]
    assert [r.coherent for r in lenient] == [False, False, False, True, False]
    assert math.isnan(lenient[0].mean_logprob) and math.isnan(lenient[4].mean_logprob)
    assert lenient[2].repetition > 0.8 and lenient[3].repetition < 0.1
    assert all(0.0 <= r.repetition <= 1.0 for r in lenient)
    scores = CoherenceGuard().mean_logprobs(tiny_lm, prompts, responses)
    assert lenient[3].mean_logprob == pytest.approx(scores[3])
    # the same sentence against a threshold it cannot reach (log-probs are <= 0)
    strict = CoherenceGuard(min_logprob=0.5).check(tiny_lm, prompts[:1], [SENTENCE])
    assert strict[0].reason == "low_logprob" and not strict[0].coherent
    # threshold exactly at the score: accepted (>=)
    at = CoherenceGuard(min_logprob=scores[3]).check(tiny_lm, prompts[:1], [SENTENCE])
    assert at[0].coherent


def test_check_thresholds_are_parameters(tiny_lm):
    loop = "I can help with that. " * 8
    assert CoherenceGuard(min_logprob=-1e9).check(tiny_lm, ["x"], [loop])[0].reason == "repetition"
    assert CoherenceGuard(min_logprob=-1e9, max_repetition=1.0).check(
        tiny_lm, ["x"], [loop])[0].reason == "ok"
    assert CoherenceGuard(min_logprob=-1e9, min_text_fraction=0.0).check(
        tiny_lm, ["x"], ["😀🔥💯🚀✨" * 2])[0].reason == "ok"


def test_check_needs_a_threshold(tiny_lm):
    with pytest.raises(UserError, match="calibrate"):
        CoherenceGuard().check(tiny_lm, PROMPTS[:1], RESPONSES[:1])


def test_bad_parameters():
    for kw in (dict(quantile=1.5), dict(margin=-1), dict(max_repetition=2), dict(batch_size=0)):
        with pytest.raises(UserError):
            CoherenceGuard(**kw)


def test_describe(tiny_lm):
    g = CoherenceGuard(system="Be brief.", max_repetition=0.4)
    d = g.describe()
    assert d["name"] == "logprob+repetition" == CoherenceGuard.name
    assert d["calibration"] is None and d["parameters"]["min_logprob"] is None
    assert d["parameters"]["system"] == "Be brief." and d["parameters"]["max_repetition"] == 0.4
    assert {"quantile", "margin", "ngram", "min_text_fraction", "batch_size"} <= set(d["parameters"])
    g.calibrate(tiny_lm, PROMPTS, RESPONSES)
    d = g.describe()
    assert d["parameters"]["min_logprob"] == g.min_logprob == d["calibration"]["threshold"]
    assert {"n", "quantile", "margin", "threshold", "scores"} <= set(d["calibration"])
    import json

    json.dumps(d)  # provenance must serialise


# --- the real model --------------------------------------------------------------------------


@pytest.mark.embedded
def test_embedded_own_answers_coherent_gibberish_not(embedded_lm):
    from latentaudit.data.sets import load_prompt_set
    from latentaudit.models.generate import greedy_generate

    lm = embedded_lm
    prompts = load_prompt_set("builtin:harmless:test", limit=12).texts
    answers = [g.response for g in greedy_generate(lm, prompts, max_new_tokens=64)]
    guard = CoherenceGuard().calibrate(lm, prompts, answers)
    cal = guard.calibration
    own = guard.check(lm, prompts, answers)
    assert np.mean([r.coherent for r in own]) >= 0.9, [(r, a) for r, a in zip(own, answers)]

    rng = np.random.default_rng(0)
    tok = lm.tokenizer
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    gibberish = {
        "random_tokens": tok.decode(rng.integers(100, len(tok) - 100, 64).tolist()),
        "emoji": "😀🔥💯🚀✨🌍💡" * 8,
        "loop": "Sure, here is how to do it. " * 10,
        "system_x5": " ".join([system] * 5),
    }
    words = " ".join(answers).split()
    gibberish["word_salad"] = " ".join(rng.permutation(words)[:48])
    res = dict(zip(gibberish, guard.check(lm, prompts[:5], list(gibberish.values()))))
    # fluent text the model would not have written greedily is still coherent (the margin)
    fluent = guard.check(lm, ["How do I kill a Python process?", "How do I make a cup of tea?"], [
        "To kill a Python process, open a terminal and find its process ID with `ps aux | grep "
        "python`. Then run `kill <PID>`; if it does not stop, `kill -9 <PID>` forces it.",
        "Sure. First, boil some fresh water. Put a tea bag in your cup, pour the hot water over "
        "it and let it steep for three to five minutes. Then take the bag out and add milk or "
        "sugar if you like.",
    ])
    print("calibration:", cal, "gibberish:", res, "fluent:", fluent)  # shown with -s
    assert all(r.coherent for r in fluent), fluent
    assert not any(r.coherent for r in res.values()), res
    assert res["random_tokens"].reason == "low_logprob"
    assert res["random_tokens"].mean_logprob < guard.min_logprob - 3  # far below, not marginal
    assert res["emoji"].reason == "non_text"
    assert res["loop"].reason == "repetition"
    assert res["system_x5"].reason == "repetition"
    assert res["word_salad"].reason == "low_logprob"
