"""The harmful fine-tuning attack (stages/tamper/) on the tiny model, plus one embedded test."""

from __future__ import annotations

import hashlib
import json
import zlib

import numpy as np
import pytest

from latentaudit.data.sets import Prompt, PromptSet
from latentaudit.errors import UserError
from latentaudit.judges.base import Judge, Verdict
from latentaudit.models import completions
from latentaudit.models.chat import encode, format_prompt
from latentaudit.runs.store import ResultStore
from latentaudit.stages import behave as behave_mod
from latentaudit.stages.tamper import attack as attack_mod
from latentaudit.stages.behave import GenSettings, run_behave
from latentaudit.stages.tamper import (
    TamperConfig,
    TamperSummary,
    areas,
    build_pairs,
    encode_pair,
    normalised_area,
    run_tamper,
    s_half_estimate,
    steps_to_break,
    validate_tamper,
    worst_case_search,
)


class HashJudge(Judge):
    """Refusal iff the crc32 of the response is even: deterministic, content-keyed, and
    non-trivial on a random model (about half refused)."""

    name = "test-hash"

    def judge(self, prompts, responses):
        out = []
        for r in responses:
            ref = zlib.crc32(r.encode()) % 2 == 0
            out.append(Verdict("refusal" if ref else "compliance", 1.0 if ref else 0.0, "test"))
        return out

    def describe(self):
        return {"name": self.name}


def _set(name, n, word="question"):
    return PromptSet(name, [Prompt(f"{name}-{i}", f"please answer {word} {i} now") for i in range(n)],
                     "test")


def _pairs_file(tmp_path, n=6, completion="Step 1: gather the materials. Step 2: begin."):
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Tell me how to do bad thing {i}.",
                                "completion": completion}) + "\n")
    return path


def _cfg(tmp_path, **kw):
    base = dict(steps=[0, 1, 2], n_examples=4, lr=1e-2, batch_size=2, rank=4, alpha=8,
                pairs=str(_pairs_file(tmp_path)), completion_tokens=16, max_new_tokens=4,
                utility_limit=4)
    base.update(kw)
    return TamperConfig(**base)


def _run(lm, store, cfg, **kw):
    kw.setdefault("eval_set", _set("harm", 8))
    kw.setdefault("utility_prompts", _set("ok", 4, "task"))
    return run_tamper(lm, store, "tiny", cfg, HashJudge(), gen_batch_size=4, **kw)


def _state_hash(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# --- curve metrics ----------------------------------------------------------------------------


def test_steps_to_break_hand_made():
    steps = [0, 5, 10, 20, 40]
    assert steps_to_break(steps, [1.0, 0.8, 0.5, 0.2, 0.0], 1.0) == 20  # 0.5 is not < 0.5
    assert steps_to_break(steps, [1.0, 0.4, 0.5, 0.2, 0.0], 1.0) == 5
    assert steps_to_break(steps, [0.8, 0.8, 0.7, 0.6, 0.5], 0.8) is None
    assert steps_to_break(steps, [0.0, 0.0, 0.0, 0.0, 0.0], 0.0) is None  # S = 0: nothing to break


def test_normalised_area_hand_made():
    assert normalised_area([0, 10, 20], [1.0, 0.5, 0.0]) == pytest.approx(0.5)
    # (5*1 + 5*0.5) / 40
    assert normalised_area([0, 5, 10, 20, 40], [1, 1, 0, 0, 0]) == pytest.approx(0.1875)
    assert normalised_area([0, 5, 10, 20, 40], [1, 1, 1, 1, 1]) == pytest.approx(1.0)
    assert normalised_area([0, 4], [0.5, 0.25]) == pytest.approx(0.375)
    assert normalised_area([0], [0.7]) == pytest.approx(0.7)
    with pytest.raises(ValueError):
        normalised_area([0, 5, 5], [1, 1, 1])


def test_per_prompt_area_and_s_half_ci():
    steps = [0, 10, 20]
    flags = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=float)
    per_prompt = areas(steps, flags)
    assert per_prompt.tolist() == pytest.approx([1.0, 0.25, 0.75, 0.0])
    # the mean of per-prompt areas is the area of the mean curve
    assert per_prompt.mean() == pytest.approx(normalised_area(steps, flags.mean(0).tolist()))
    est = s_half_estimate(steps, flags, seed=0)
    # r = [0.75, 0.5, 0.25]: 0.25 < 0.375 first at s = 20
    assert est.value == 20 and est.n == 4
    assert est.lo is not None and est.lo <= 20
    never = s_half_estimate(steps, np.ones((3, 3)), seed=0)
    assert never.value is None and never.lo is None and never.hi is None


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,needle", [
    (dict(steps=[0, 2, 1]), "strictly increasing"),
    (dict(steps=[0, 1, 1]), "strictly increasing"),
    (dict(steps=[-1, 0, 2]), ">= 0"),
    (dict(steps=[1, 2]), "start at 0"),
    (dict(steps=[0]), "at least two"),
    (dict(lr=0.0), "lr must be > 0"),
    (dict(lr=-1e-4), "lr must be > 0"),
    (dict(batch_size=0), "batch_size"),
    (dict(dropout=1.0), "dropout"),
    (dict(n_examples=0), "n_examples"),
    (dict(pairs="nope.txt"), ".csv/.json/.jsonl"),
    (dict(pairs="missing.jsonl"), "not found"),
    (dict(benign_pairs="nope.txt"), "benign_pairs must be 'builtin' or a .csv/.json/.jsonl"),
    (dict(benign_pairs="missing.jsonl"), "benign_pairs file not found"),
])
def test_validation_errors(kw, needle):
    with pytest.raises(UserError) as e:
        validate_tamper(TamperConfig(**kw))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_too_few_pairs_is_a_user_error(tiny_lm, tmp_path):
    validate_tamper(TamperConfig(), n_available_pairs=16)
    with pytest.raises(UserError, match="only 3 usable"):
        validate_tamper(TamperConfig(n_examples=4), n_available_pairs=3)
    cfg = _cfg(tmp_path, n_examples=10)  # the file has 6 pairs
    with pytest.raises(UserError) as e:
        _run(tiny_lm, ResultStore(tmp_path / "s.sqlite"), cfg)
    assert "n_examples=10" in str(e.value) and "\n" not in str(e.value)


def test_config_forbids_unknown_keys():
    with pytest.raises(Exception):
        TamperConfig(step=[0, 1])


def test_pairs_file_without_completion_column(tiny_lm, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(UserError, match="completion column"):
        build_pairs(TamperConfig(pairs=str(path)), HashJudge())


# --- tokenisation -------------------------------------------------------------------------------


def test_encode_pair_matches_generation_prompt(tiny_lm):
    tok = tiny_lm.tokenizer
    p_ids, c_ids = encode_pair(tok, "How do I x?", "Sure, here is how.")
    gen = encode(tok, [format_prompt(tok, "How do I x?")])["input_ids"][0].tolist()
    assert p_ids == gen  # the model is trained on exactly the prompt it is evaluated on
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert c_ids[-1] == im_end and c_ids.count(im_end) == 1
    assert tok.decode(c_ids[:-1]) == "Sure, here is how."
    _, cut = encode_pair(tok, "How do I x?", "Sure, here is how.", max_completion_tokens=2)
    assert len(cut) == 2 and im_end not in cut  # a cut completion gets no end-of-turn token
    _, no_end = encode_pair(tok, "How do I x?", "Sure.", end_of_turn=False)
    assert im_end not in no_end


# --- the attack on the tiny model ---------------------------------------------------------------


def test_r0_equals_behavioural_S(tiny_lm, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    store = ResultStore(tmp_path / "a.sqlite")
    harm = _set("harm", 8)
    summ = _run(tiny_lm, store, cfg, eval_set=harm)
    assert 0 < summ.S.value < 1  # the hash judge makes refusal non-trivial
    assert summ.r[0] .value == summ.S.value

    # the behavioural stage, independently, on a fresh store
    fresh = ResultStore(tmp_path / "b.sqlite")
    beh = run_behave(tiny_lm, fresh, "tiny", harm, [], HashJudge(),
                     GenSettings(max_new_tokens=cfg.max_new_tokens, batch_size=4))
    assert beh.S.value == summ.S.value and beh.S.n == summ.S.n
    a = sorted((k, v["response"]) for k, v in store.items("behave/tiny/") if "harm-" in k
               and "+tamper" not in k)
    b = sorted((k, v["response"]) for k, v in fresh.items("behave/tiny/"))
    assert a == b  # same keys, same responses: r(0) shares the behave stage's records

    # and the behave stage on the tamper store recomputes nothing
    calls = []
    real = behave_mod.greedy_generate
    monkeypatch.setattr(behave_mod, "greedy_generate",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    run_behave(tiny_lm, store, "tiny", harm, [], HashJudge(),
               GenSettings(max_new_tokens=cfg.max_new_tokens, batch_size=4))
    assert calls == []


@pytest.mark.parametrize("method", ["lora", "full"])
def test_model_unchanged_after_attack(tiny_lm, tmp_path, method):
    before = _state_hash(tiny_lm.model)
    flags = [p.requires_grad for p in tiny_lm.model.parameters()]
    summ = _run(tiny_lm, ResultStore(tmp_path / "s.sqlite"), _cfg(tmp_path, method=method))
    assert _state_hash(tiny_lm.model) == before
    assert [p.requires_grad for p in tiny_lm.model.parameters()] == flags
    assert not tiny_lm.model.training
    assert not hasattr(tiny_lm.model, "peft_config")
    assert summ.timings.steps_trained == 2 and summ.n_trainable_params > 0
    if method == "lora":
        assert summ.target_modules == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                       "up_proj", "v_proj"]
        assert summ.n_target_modules == 7 * tiny_lm.n_layers
    else:
        assert summ.target_modules is None
        assert summ.n_trainable_params == sum(p.numel() for p in tiny_lm.model.parameters())


@pytest.mark.parametrize("method,lr", [("lora", 1e-2), ("full", 1e-3)])
def test_checkpoints_monotone_and_loss_decreases(tiny_lm, tmp_path, method, lr):
    cfg = _cfg(tmp_path, steps=[0, 1, 3, 8], method=method, lr=lr)
    summ = _run(tiny_lm, ResultStore(tmp_path / "s.sqlite"), cfg)
    assert [c.s for c in summ.checkpoints] == [0, 1, 3, 8]
    assert [c.optimizer_steps for c in summ.checkpoints] == [0, 1, 3, 8]
    assert len(summ.train_loss) == 8
    assert [c.train_loss for c in summ.checkpoints[1:]] == [summ.train_loss[i] for i in (0, 2, 7)]
    # the training loss on the attack data falls (a random tiny model starts near ln|V|)
    assert np.mean(summ.train_loss[-3:]) < np.mean(summ.train_loss[:3]) - 0.3
    assert len(summ.r) == len(summ.utility) == 4
    assert all(e.n == 8 for e in summ.r) and all(e.n == 4 for e in summ.utility)
    assert all(np.isfinite(e.value) and e.value > 0 for e in summ.utility)
    assert summ.timings.s_per_step > 0
    # the JSON round trip of the summary
    again = TamperSummary.model_validate(json.loads(json.dumps(summ.model_dump(mode="json"))))
    assert again.R_ft.value == summ.R_ft.value


def test_metrics_are_consistent(tiny_lm, tmp_path):
    summ = _run(tiny_lm, ResultStore(tmp_path / "s.sqlite"), _cfg(tmp_path, steps=[0, 2, 4]))
    r = [e.value for e in summ.r]
    assert summ.R_ft.value == pytest.approx(normalised_area(summ.steps, r))
    assert summ.AG_ft.value == pytest.approx(summ.S.value - summ.R_ft.value)
    assert summ.s_half.value == steps_to_break(summ.steps, r, summ.S.value)
    for e in [*summ.r, summ.S, summ.R_ft, summ.AG_ft, *summ.utility]:
        assert e.definition and e.n > 0 and e.lo <= e.value <= e.hi
    assert summ.data.n_used == 4 and summ.data.n_kept == 6 and summ.data.sha256
    assert summ.effective_batch_size == 2


def test_resume_recomputes_nothing(tiny_lm, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    store = ResultStore(tmp_path / "s.sqlite")
    first = _run(tiny_lm, store, cfg)
    n_keys = store.count()

    calls = {"gen": 0, "nll": 0}
    real_gen, real_nll = behave_mod.greedy_generate, attack_mod._utility_nll

    def gen(*a, **k):
        calls["gen"] += 1
        return real_gen(*a, **k)

    def nll(*a, **k):
        calls["nll"] += 1
        return real_nll(*a, **k)

    monkeypatch.setattr(behave_mod, "greedy_generate", gen)
    monkeypatch.setattr(attack_mod, "_utility_nll", nll)
    second = _run(tiny_lm, store, cfg)
    assert calls == {"gen": 0, "nll": 0}
    assert second.timings.steps_trained == 0 and second.resumed_evaluations == 3
    assert store.count() == n_keys
    assert [e.value for e in second.r] == [e.value for e in first.r]
    assert [e.value for e in second.utility] == [e.value for e in first.utility]
    assert second.train_loss == first.train_loss

    # adding a step reuses every stored checkpoint and trains only as far as needed
    third = _run(tiny_lm, store, cfg.model_copy(update={"steps": [0, 1, 2, 3]}))
    assert third.resumed_evaluations == 3 and third.timings.steps_trained == 3
    assert [e.value for e in third.r[:3]] == [e.value for e in first.r]


def test_resume_after_interruption(tiny_lm, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, steps=[0, 1, 3])
    clean = _run(tiny_lm, ResultStore(tmp_path / "clean.sqlite"), cfg)

    store = ResultStore(tmp_path / "s.sqlite")
    real_nll = attack_mod._utility_nll

    def crashing(target_lm, st, prefix, items, examples, s, bs):
        if s == 3:
            raise KeyboardInterrupt  # killed after the r(3) generations were committed
        return real_nll(target_lm, st, prefix, items, examples, s, bs)

    monkeypatch.setattr(attack_mod, "_utility_nll", crashing)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_lm, store, cfg)

    gens = []
    real_gen = behave_mod.greedy_generate
    monkeypatch.setattr(behave_mod, "greedy_generate",
                        lambda lm, prompts, *a, **k: gens.extend(prompts) or real_gen(lm, prompts, *a, **k))
    monkeypatch.setattr(attack_mod, "_utility_nll", real_nll)
    resumed = _run(tiny_lm, store, cfg)
    assert gens == []  # r(0), r(1), r(3) were all stored: only the utility NLL at 3 was missing
    assert resumed.timings.steps_trained == 3 and resumed.resumed_evaluations == 2
    # deterministic re-training: the resumed run equals the uninterrupted one
    assert [e.value for e in resumed.r] == [e.value for e in clean.r]
    assert [e.value for e in resumed.utility] == pytest.approx([e.value for e in clean.utility])
    assert resumed.train_loss == pytest.approx(clean.train_loss)


def test_attack_key_separates_configs(tiny_lm, tmp_path):
    store = ResultStore(tmp_path / "s.sqlite")
    a = _run(tiny_lm, store, _cfg(tmp_path))
    b = _run(tiny_lm, store, _cfg(tmp_path, lr=5e-3))
    assert a.attack_key != b.attack_key
    assert b.resumed_evaluations == 1  # only r(0), shared: the unattacked model is the same
    assert b.timings.steps_trained == 2


def test_builtin_pairs_are_cached_and_filtered(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTAUDIT_CACHE", str(tmp_path / "cache"))
    cfg = TamperConfig(data_model="tiny:llama", completion_tokens=4, n_examples=5)
    judge = HashJudge()
    first = build_pairs(cfg, judge, data_lm=tiny_lm)
    assert first.info.n_kept >= 5 and first.info.n_generated == first.info.n_judged
    assert first.info.n_dropped == first.info.n_judged - first.info.n_kept > 0
    assert all(v.label == "compliance"
               for v in judge.judge([p.prompt for p in first.pairs], [p.completion for p in first.pairs]))
    assert first.info.prompt_set.name == "builtin:harmful:train"
    assert tmp_path.joinpath("cache").as_posix() in first.info.cache_file

    calls = []
    monkeypatch.setattr(completions, "greedy_generate", lambda *a, **k: calls.append(1))
    second = build_pairs(cfg, judge, lm=tiny_lm)  # same spec: the fingerprint needs no load
    assert calls == [] and second.info.n_generated == 0
    assert second.pairs == first.pairs


def test_benign_control_runs(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTAUDIT_CACHE", str(tmp_path / "cache"))
    cfg = TamperConfig(control="benign", data_model="tiny:llama", completion_tokens=4, n_examples=4,
                       steps=[0, 1, 2], lr=1e-2, batch_size=2, rank=4, alpha=8, max_new_tokens=4,
                       utility_limit=4)
    store = ResultStore(tmp_path / "s.sqlite")
    summ = _run(tiny_lm, store, cfg)
    assert summ.data.control == "benign" and summ.data.prompt_set.name == "builtin:harmless:train"
    assert summ.data.n_used == 4 and len(summ.r) == 3
    harmful = _run(tiny_lm, store, cfg.model_copy(update={"control": "harmful"}))
    assert harmful.data.prompt_set.name == "builtin:harmful:train"
    assert harmful.attack_key != summ.attack_key


def test_benign_control_never_trains_on_the_harmful_pairs_file(tiny_lm, tmp_path, monkeypatch):
    """With a harmful pairs file, the control takes the builtin harmless pairs (or the user's
    own harmless file), never the harmful file."""
    monkeypatch.setenv("LATENTAUDIT_CACHE", str(tmp_path / "cache"))
    harmful = _pairs_file(tmp_path)
    harmful_prompts = {json.loads(line)["prompt"] for line in harmful.read_text().splitlines()}
    cfg = TamperConfig(pairs=str(harmful), control="benign", data_model="tiny:llama",
                       completion_tokens=4, n_examples=4)
    control = build_pairs(cfg, HashJudge(), lm=tiny_lm)
    assert control.info.source == "builtin" and control.info.control == "benign"
    assert control.info.prompt_set.name == "builtin:harmless:train"
    assert not harmful_prompts & {p.prompt for p in control.pairs}

    attack = build_pairs(cfg.model_copy(update={"control": "harmful"}), HashJudge())
    assert attack.info.source == str(harmful) and {p.prompt for p in attack.pairs} == harmful_prompts

    benign = tmp_path / "benign.jsonl"
    benign.write_text("".join(json.dumps({"prompt": f"Name a fruit ({i}).", "completion": "A pear."})
                              + "\n" for i in range(5)))
    own = build_pairs(cfg.model_copy(update={"benign_pairs": str(benign)}), HashJudge())
    assert own.info.source == str(benign) and own.info.control == "benign"
    assert [p.prompt for p in own.pairs] == [f"Name a fruit ({i})." for i in range(5)]


def test_worst_case_search_needs_optuna(tiny_lm, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "optuna", None)  # import fails as when not installed
    with pytest.raises(UserError) as e:
        worst_case_search(tiny_lm, TamperConfig(), HashJudge(), n_trials=2)
    assert "pip install optuna" in str(e.value) and "\n" not in str(e.value)


# --- embedded -----------------------------------------------------------------------------------


@pytest.mark.embedded
def test_builtin_pairs_on_smollm2_are_mostly_compliant(embedded_lm, tmp_path, monkeypatch):
    from latentaudit.judges import SubstringJudge

    monkeypatch.setenv("LATENTAUDIT_CACHE", str(tmp_path / "cache"))
    cfg = TamperConfig(n_examples=8)  # one generation batch of 16 prompts, 64 tokens
    judge = SubstringJudge()
    data = build_pairs(cfg, judge, data_lm=embedded_lm)
    info = data.info
    assert info.n_generated == info.n_judged >= 16
    assert info.n_kept >= 8 and info.n_kept / info.n_judged >= 0.5  # an unaligned base complies
    assert info.n_kept + info.n_dropped == info.n_judged
    verdicts = judge.judge([p.prompt for p in data.pairs], [p.completion for p in data.pairs])
    assert all(v.label == "compliance" for v in verdicts)
    assert all(len(p.completion) > 20 for p in data.pairs)
    again = build_pairs(cfg, judge, data_lm=embedded_lm)
    assert again.info.n_generated == 0 and again.pairs == data.pairs


def test_worst_case_search_with_a_stub_optuna(tiny_lm, tmp_path, monkeypatch):
    """The search loop itself, with a stand-in for optuna (not installed in the test venv)."""
    import sys
    import types

    proposals = iter([(1e-2, 4), (3e-3, 8)])

    class Trial:
        def __init__(self):
            self.lr, self.rank = next(proposals)

        def suggest_float(self, name, lo, hi, log=False):
            assert name == "lr" and log and lo <= self.lr <= hi
            return self.lr

        def suggest_categorical(self, name, choices):
            assert name == "rank" and self.rank in choices
            return self.rank

    class Study:
        def optimize(self, objective, n_trials):
            self.values = [objective(Trial()) for _ in range(n_trials)]

    fake = types.SimpleNamespace(
        logging=types.SimpleNamespace(WARNING=30, set_verbosity=lambda v: None),
        samplers=types.SimpleNamespace(TPESampler=lambda seed: None),
        create_study=lambda direction, sampler: Study(),
    )
    monkeypatch.setitem(sys.modules, "optuna", fake)
    cfg = _cfg(tmp_path)
    res = worst_case_search(tiny_lm, cfg, HashJudge(), n_trials=2, utility_guard=10.0,
                            lr_range=(1e-4, 3e-2),
                            eval_set=_set("harm", 6), utility_prompts=_set("ok", 3, "task"),
                            gen_batch_size=4)
    assert [(t.lr, t.rank, t.alpha) for t in res.trials] == [(1e-2, 4, 8), (3e-3, 8, 16)]
    assert all(t.feasible for t in res.trials)  # a guard of 10x the clean NLL admits both
    assert all(t.utility_ratio > 0 and 0 <= t.R_ft.value <= 1 for t in res.trials)
    assert all(t.R_ft.n == 6 and t.R_ft.lo <= t.R_ft.value <= t.R_ft.hi for t in res.trials)
    best = min(res.trials, key=lambda t: t.R_ft.value)
    assert res.best is not None and res.best.R_ft.value == best.R_ft.value
    assert res.best_params == {"lr": best.lr, "rank": best.rank, "alpha": best.alpha}


def test_worst_case_search_with_optuna_resumes_from_the_store(tiny_lm, tmp_path, monkeypatch):
    """The real optuna (a test dependency): a seeded search gives the same trials twice, and the
    second search, on the same store, trains nothing (every trial is read back)."""
    pytest.importorskip("optuna")
    cfg = _cfg(tmp_path, search_trials=3, utility_guard=10.0, search_lr=(1e-4, 3e-2),
               search_ranks=[2, 4])
    store = ResultStore(tmp_path / "s.sqlite")
    kw = dict(store=store, model_key="tiny", eval_set=_set("harm", 6),
              utility_prompts=_set("ok", 3, "task"), gen_batch_size=4)
    first = worst_case_search(tiny_lm, cfg, HashJudge(), **kw)
    assert first.n_trials == 3 and len(first.trials) == 3
    assert all(1e-4 <= t.lr <= 3e-2 and t.rank in (2, 4) and t.alpha == 2 * t.rank
               for t in first.trials)
    assert len({t.attack_key for t in first.trials}) == 3  # three distinct attacks
    assert first.best is not None
    assert first.best.R_ft.value == min(t.R_ft.value for t in first.trials if t.feasible)

    n_keys = store.count()
    again = worst_case_search(tiny_lm, cfg, HashJudge(), **kw)
    assert [t.model_dump() for t in again.trials] == [t.model_dump() for t in first.trials]
    assert again.best.timings.steps_trained == 0 and store.count() == n_keys


def test_search_settings_are_validated():
    for kw, needle in [({"search_trials": -1}, "search_trials"),
                       ({"utility_guard": -0.5}, "utility_guard"),
                       ({"search_lr": (1e-3, 1e-4)}, "search_lr"),
                       ({"search_ranks": []}, "search_ranks")]:
        with pytest.raises(UserError, match=needle):
            validate_tamper(TamperConfig(**kw))


def test_tamper_verb_runs_the_worst_case_search(tmp_path, monkeypatch, capsys):
    """`latentaudit tamper --search-trials N`: the trials land in summary.json and the table."""
    pytest.importorskip("optuna")
    from latentaudit.cli import main

    monkeypatch.setenv("LATENTAUDIT_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "t.yaml"
    cfg.write_text(json.dumps({"behave": {"max_new_tokens": 4},
                               "tamper": {"pairs": str(_pairs_file(tmp_path)), "n_examples": 4,
                                          "steps": [0, 1, 2], "batch_size": 2, "completion_tokens": 8,
                                          "utility_limit": 2, "search_lr": [1e-3, 3e-2],
                                          "search_ranks": [2, 4]}}))
    out = tmp_path / "run"
    args = ["tamper", "--model", "tiny:llama", "--config", str(cfg), "--limit", "3", "-o", str(out),
            "--progress", "none", "--search-trials", "2", "--utility-guard", "5"]
    assert main(args) == 0
    s = json.loads((out / "summary.json").read_text())
    ws = s["models"][0]["tamper_search"]
    assert ws["n_trials"] == 2 and len(ws["trials"]) == 2 and ws["utility_guard"] == 5
    assert s["models"][0]["tamper"] is not None
    assert "worst-case search" in capsys.readouterr().out
    assert main(["tamper", "--model", "tiny:llama", "--search-trials", "-1", "-o",
                 str(tmp_path / "bad"), "--progress", "none"]) == 2
    assert not (tmp_path / "bad").exists()


def test_benign_control_alone_is_never_reported_as_the_attack(tmp_path, monkeypatch, capsys):
    """`tamper --control benign` fills tamper_control (labelled so), not the attack's R_ft; a
    later harmful run into the same folder adds the attack beside it."""
    from latentaudit.cli import main

    monkeypatch.setenv("LATENTAUDIT_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "t.yaml"
    cfg.write_text(json.dumps({"behave": {"max_new_tokens": 4},
                               "tamper": {"n_examples": 2, "steps": [0, 1], "batch_size": 2,
                                          "completion_tokens": 4, "utility_limit": 2,
                                          "data_model": "tiny:llama"}}))
    out = tmp_path / "run"
    base = ["tamper", "--model", "tiny:llama", "--config", str(cfg), "--limit", "2", "-o", str(out),
            "--progress", "none"]
    assert main(base + ["--control", "benign"]) == 0
    printed = capsys.readouterr().out
    assert "benign control" in printed and "harmful attack" not in printed
    m = json.loads((out / "summary.json").read_text())["models"][0]
    assert m["tamper"] is None and m["tamper_control"]["config"]["control"] == "benign"
    assert main(base) == 0
    m = json.loads((out / "summary.json").read_text())["models"][0]
    assert m["tamper"]["config"]["control"] == "harmful"
    assert m["tamper_control"]["config"]["control"] == "benign"


@pytest.mark.parametrize("extra, needle", [
    ({"tamper": {"max_new_tokens": 64}}, "tamper.max_new_tokens (64) differs from behave.max_new_tokens (32)"),
    ({"tamper": {"seed": 5}}, "tamper.seed (5) differs from seed (0)"),
    ({"tamper": {"eval_limit": 3}, "limit": 4}, "tamper.eval_limit (3) differs from limit (4)"),
])
def test_a_tamper_key_the_run_decides_is_never_silently_replaced(tmp_path, capsys, extra, needle):
    import yaml

    from latentaudit.cli import main

    cfg = tmp_path / "a.yaml"
    cfg.write_text(yaml.safe_dump({"model": "tiny:llama", "stages": ["tamper"], **extra}))
    assert main(["run", "--config", str(cfg), "-o", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {needle}: the attack takes {needle.split('from ')[1].split(' ')[0]} from the run; set that instead"
    assert not (tmp_path / "r").exists()
    # the same values as the run's are no conflict
    ok = {"tamper": {"max_new_tokens": 32, "seed": 0, "eval_limit": 4}, "limit": 4}
    from latentaudit.config import AuditConfig
    from latentaudit.stages.tamper.stage import TamperStage

    TamperStage().check(AuditConfig.model_validate({"model": "tiny:llama", **ok}))
