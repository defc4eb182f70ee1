"""Model-backed judges (classifier, guard, seqcls) on tiny models saved to temporary folders.

The "bigram" models below have every attention and MLP output zeroed, so the last hidden state
depends only on the last token: each token of interest gets its own embedding direction, and the
LM head then sets exact next-token logits per last token. That makes verdicts and scores
known in advance; the random models check batching, truncation and the answer position.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaForSequenceClassification, PreTrainedTokenizerFast

from latentaudit.errors import UserError
from latentaudit.judges.base import JudgeOptions
from latentaudit.judges.spec import make_judge
from latentaudit.judges.classifier import (
    GuardJudge,
    SequenceClassifierJudge,
    YesNoClassifierJudge,
    guard_category,
    label_side,
)
from latentaudit.models.tiny import tiny_config, tiny_model, tiny_tokenizer

CPU = dict(device="cpu", dtype="auto")
ROWS = [("How do I bake bread?", "Sure, here is how to bake a simple loaf of bread at home."),
        ("Tell me a joke.", "I'm sorry, but I cannot help with that."),
        ("Write a story.", "Once"),
        ("How can I make poison?", "Step 1: gather the materials. Step 2: read the instructions."),
        ("Hi", "The quick brown fox jumps over the lazy dog. " * 3)]


def _save(model, folder: Path, chat_template: str | None | bool = True) -> Path:
    """Save ``model`` with a copy of the tiny tokenizer (its template replaced unless True)."""
    tok = tiny_tokenizer()
    if chat_template is not True:
        tok = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token=tok.bos_token,
                                      eos_token=tok.eos_token, pad_token=tok.pad_token,
                                      padding_side="left", model_max_length=256,
                                      chat_template=chat_template, clean_up_tokenization_spaces=False)
    tok.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def _tid(token: str) -> int:
    i = tiny_tokenizer().convert_tokens_to_ids(token)
    assert i is not None and i != tiny_tokenizer().unk_token_id, token
    return i


def _silence_blocks(model) -> None:
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


@torch.no_grad()
def bigram_lm(edges: dict[str | None, dict[str, float]]):
    """A causal LM whose next-token logits are ``edges[last token][next token]`` (0 elsewhere);
    key None: every last token not listed."""
    m = tiny_model("llama")
    _silence_blocks(m)
    emb, head = m.model.embed_tokens.weight, m.lm_head.weight
    emb.zero_()
    emb[:, 0] = 8.0  # rms 1: the final norm passes 8 * one-hot through unchanged
    head.zero_()
    for c, (ctx, nexts) in enumerate(edges.items()):
        if ctx is not None:
            emb[_tid(ctx)] = 0.0
            emb[_tid(ctx), c + 1] = 8.0
        for tok, logit in nexts.items():
            head[_tid(tok), 0 if ctx is None else c + 1] = logit / 8.0
    return m


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory) -> Path:
    return _save(tiny_model("llama", seed=1), tmp_path_factory.mktemp("random"))


def _opts(**kw) -> JudgeOptions:
    return JudgeOptions(**{**CPU, **kw})


# ---- classifier ----------------------------------------------------------------------------

@pytest.mark.parametrize("yes,no", [(4.0, 1.0), (0.5, 2.5)])
def test_classifier_verdict_follows_yes_no_logits(tmp_path, yes, no):
    d = _save(bigram_lm({None: {"Y": yes, "N": no}}), tmp_path)
    j = YesNoClassifierJudge(target=str(d), options=_opts())
    [v] = j.judge(["How do I make poison?"], ["Here is how."])
    expect = 1 / (1 + math.exp(yes - no))  # P(No) over {Yes, No}
    assert v.score == pytest.approx(expect, abs=1e-5)
    assert v.label == ("refusal" if no > yes else "compliance")
    word, p = ("no", expect) if no > yes else ("yes", 1 - expect)
    assert v.reason == f"classifier:{word} p={p:.2f}"


def test_classifier_reads_the_answer_position_and_batches(random_dir):
    tok = tiny_tokenizer()
    j = YesNoClassifierJudge(target=str(random_dir), options=_opts(batch_size=2))
    prompts, responses = map(list, zip(*ROWS))
    batched = j.judge(prompts, responses)
    assert j.answer_ids == ([_tid("N")], [_tid("Y")])  # " No" opens with a bare space: dropped
    single = YesNoClassifierJudge(target=str(random_dir), options=_opts(batch_size=1))
    one = [single.judge([p], [r])[0] for p, r in ROWS]
    assert [v.score for v in batched] == pytest.approx([v.score for v in one], abs=1e-5)
    assert [v.label for v in batched] == [v.label for v in one]
    # the score is the restricted softmax at the last position of the rendered prompt
    model = j.model
    for (p, r), v in zip(ROWS, batched):
        ids = tok(j.render(p, r))["input_ids"]
        logits = model(torch.tensor([ids])).logits[0, -1]
        p_no = torch.softmax(logits[[_tid("N"), _tid("Y")]], -1)[0].item()
        assert v.score == pytest.approx(p_no, abs=1e-5)
    assert len({round(v.score, 6) for v in batched}) == len(ROWS)  # the rows are not all alike


def test_long_response_is_cut_to_its_head(random_dir):
    long = "The quick brown fox jumps over the lazy dog. " * 20
    j = YesNoClassifierJudge(target=str(random_dir), options=_opts(max_response_tokens=16))
    [v_long] = j.judge(["Write a story."], [long])
    n = len(tiny_tokenizer()(long, add_special_tokens=False)["input_ids"])
    head, cut = j.truncate(long, 16)
    assert len(tiny_tokenizer()(head, add_special_tokens=False)["input_ids"]) == 16
    assert cut == n - 16 and long.startswith(head)
    [v_head] = j.judge(["Write a story."], [head])
    assert v_long.score == pytest.approx(v_head.score, abs=1e-6) and v_long.label == v_head.label
    assert v_long.reason == v_head.reason + f" cut={cut}"
    full = YesNoClassifierJudge(target=str(random_dir), options=_opts(max_response_tokens=4096))
    assert full.judge(["Write a story."], [long])[0].score != pytest.approx(v_head.score, abs=1e-6)


def test_empty_responses_need_no_model_and_lengths_must_match(tmp_path):
    j = YesNoClassifierJudge(target=str(tmp_path / "absent"), options=_opts())
    vs = j.judge(["a", "b"], ["", "  \n"])  # would raise if it tried to load
    assert [(v.label, v.score, v.reason) for v in vs] == [("refusal", 1.0, "empty")] * 2
    with pytest.raises(ValueError):
        j.judge(["a"], ["x", "y"])


def test_special_token_strings_in_responses_are_removed(random_dir):
    j = YesNoClassifierJudge(target=str(random_dir), options=_opts())
    [a, b] = j.judge(["q", "q"], ["fine<|im_end|> answer", "fine answer"])
    assert a.score == pytest.approx(b.score, abs=1e-6)


def test_dtype_and_device(random_dir):
    j = YesNoClassifierJudge(target=str(random_dir), options=_opts())
    j.load()
    j.load()  # idempotent
    assert j.dtype == torch.float32 and j.device.type == "cpu"
    assert next(j.model.parameters()).dtype == torch.float32
    b = YesNoClassifierJudge(target=str(random_dir), options=_opts(dtype="bfloat16"))
    b.load()
    assert next(b.model.parameters()).dtype == torch.bfloat16


# ---- load errors and description -----------------------------------------------------------

def _wordlevel_dir(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1, "</s>": 2, "hello": 3}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]",
                            eos_token="</s>").save_pretrained(folder)
    tiny_config("llama").save_pretrained(folder)  # the check comes before any weights
    return folder


@pytest.mark.parametrize("cls,word", [(YesNoClassifierJudge, "No"), (GuardJudge, "safe")])
def test_tokenizer_without_the_answer_words(tmp_path, cls, word):
    d = _wordlevel_dir(tmp_path)
    with pytest.raises(UserError, match=f"tokenizer of .*has no token that starts '{word}'") as e:
        cls(target=str(d), options=_opts()).load()
    assert "\n" not in str(e.value)


def test_missing_targets_are_user_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="not found"):
        GuardJudge(target=str(tmp_path / "nope"), options=_opts()).load()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        SequenceClassifierJudge(target=str(tmp_path / "empty"), options=_opts()).load()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id is then looked up in the cache only
    j = YesNoClassifierJudge(target="latentaudit-test/no-such-judge@v2", options=_opts())
    assert j.describe()["parameters"]["fingerprint"] == "latentaudit-test/no-such-judge@v2"
    with pytest.raises(UserError, match="no-such-judge"):
        j.load()


def test_describe_is_stable_and_tracks_the_folder(tmp_path, random_dir):
    a = YesNoClassifierJudge(target=str(random_dir), options=_opts())
    before = a.describe()
    assert set(before["parameters"]) >= {"target", "fingerprint", "prompt_version", "max_response_tokens"}
    a.load()
    assert a.describe() == before == YesNoClassifierJudge(target=str(random_dir), options=_opts()).describe()
    copy = shutil.copytree(random_dir, tmp_path / "copy")  # content, not place, identifies it
    assert YesNoClassifierJudge(target=str(copy), options=_opts()).fingerprint() == a.fingerprint()
    other = _save(tiny_model("llama", seed=2), tmp_path / "other")  # same sizes, other weights
    assert YesNoClassifierJudge(target=str(other), options=_opts()).fingerprint() != a.fingerprint()
    assert GuardJudge(target=str(random_dir), options=_opts()).describe()["parameters"]["prompt_version"] \
        != before["parameters"]["prompt_version"]
    for kind, cls in (("classifier", YesNoClassifierJudge), ("guard", GuardJudge),
                      ("seqcls", SequenceClassifierJudge)):  # the registry's specs
        j = make_judge(f"{kind}:{random_dir}", _opts())
        assert type(j) is cls and j.model is None and j.describe()["name"] == kind
    hub = GuardJudge(target="meta-llama/Llama-Guard-3-1B", options=_opts())
    assert hub.describe()["parameters"]["fingerprint"] == "meta-llama/Llama-Guard-3-1B@main"


# ---- guard ---------------------------------------------------------------------------------

UNSAFE_S2 = {None: {"un": 3.0, "s": 1.0}, "un": {"s": 5.0}, "s": {"af": 5.0}, "af": {"e": 5.0},
             "e": {"Ċ": 5.0}, "Ċ": {"S": 5.0}, "S": {"2": 5.0}, "2": {"<|endoftext|>": 5.0}}


def _p_safe(safe: float, unsafe: float) -> float:
    """P(safe) over both spellings of each word: "safe"/"unsafe" open with "s"/"un", and
    " safe"/" unsafe" with "Ġsaf"/"Ġun", whose logits are 0 in the bigram models."""
    s, u = math.exp(safe) + 1.0, math.exp(unsafe) + 1.0
    return s / (s + u)


def test_guard_unsafe_reads_the_category(tmp_path):
    d = _save(bigram_lm(UNSAFE_S2), tmp_path, chat_template=None)
    j = GuardJudge(target=str(d), options=_opts())
    [v] = j.judge(["How do I steal a car?"], ["First, ..."])
    assert j.answer_ids == (sorted([_tid("s"), _tid("Ġsaf")]), sorted([_tid("un"), _tid("Ġun")]))
    assert v.label == "compliance" and v.score == pytest.approx(_p_safe(1.0, 3.0), abs=1e-5)
    assert v.raw == "unsafe\nS2" and v.reason == f"guard:unsafe S2 p={1 - _p_safe(1.0, 3.0):.2f}"


def test_guard_safe_and_leading_whitespace(tmp_path):
    # the answer's first token is a bare space, as after a template that ends before "\n\n"
    d = _save(bigram_lm({None: {"Ġ": 6.0}, "Ġ": {"un": 1.0, "s": 3.0}}), tmp_path, chat_template=None)
    [v] = GuardJudge(target=str(d), options=_opts()).judge(["q"], ["I cannot help with that."])
    assert v.label == "refusal" and v.raw is None
    p = _p_safe(3.0, 1.0)  # read after the space; before it, safe and unsafe tie at 0.5
    assert v.score == pytest.approx(p, abs=1e-5) and v.reason == f"guard:safe p={p:.2f}"


def test_guard_uses_the_tokenizer_chat_template(tmp_path, random_dir):
    tpl = ("{{ '<<GUARD-TPL>>' }}{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] + "
           "'\n' }}{% endfor %}{{ 'verdict:' }}")
    d = _save(tiny_model("llama"), tmp_path / "tpl", chat_template=tpl)
    j = GuardJudge(target=str(d), options=_opts())
    j.load()
    assert j.render("How?", "Like so.") == "<<GUARD-TPL>>[user] How?\n[assistant] Like so.\nverdict:"
    assert len(j.judge(["How?"], ["Like so."])) == 1
    # a template that reads content as typed parts (as Llama Guard 3 1B's does)
    parts = "{% for m in messages %}{{ m['role'] + ':' + m['content'][0]['text'] + ';' }}{% endfor %}"
    d2 = _save(tiny_model("llama"), tmp_path / "parts", chat_template=parts)
    j2 = GuardJudge(target=str(d2), options=_opts())
    j2.load()
    assert j2.render("How?", "Like so.") == "user:How?;assistant:Like so.;"
    # no template: the built-in Llama-Guard-style prompt
    d3 = _save(tiny_model("llama"), tmp_path / "none", chat_template=None)
    j3 = GuardJudge(target=str(d3), options=_opts())
    j3.load()
    text = j3.render("How?", "Like so.")
    assert "User: How?" in text and "Agent: Like so." in text and "S1:" in text
    assert "Provide your safety assessment for the last Agent message" in text


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: absolute positions
def test_guard_batches_like_one_by_one(tmp_path, family):
    tpl = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    d = _save(tiny_model(family, seed=4), tmp_path, chat_template=tpl)
    prompts, responses = map(list, zip(*ROWS))
    b = GuardJudge(target=str(d), options=_opts(batch_size=3)).judge(prompts, responses)
    s = [GuardJudge(target=str(d), options=_opts(batch_size=1)).judge([p], [r])[0] for p, r in ROWS]
    assert [v.score for v in b] == pytest.approx([v.score for v in s], abs=1e-5)
    assert [v.raw for v in b] == [v.raw for v in s]


def test_guard_category():
    assert guard_category("unsafe\nS10,S2") == "S10"
    assert guard_category("unsafe") is None and guard_category("unsafeS2x") is None


# ---- sequence classifier -------------------------------------------------------------------

@torch.no_grad()
def _seqcls_dir(folder: Path, id2label: dict[int, str], logits: tuple[float, float] | None, seed=0):
    cfg = tiny_config("llama", num_labels=2, id2label=id2label,
                      label2id={v: k for k, v in id2label.items()})
    torch.manual_seed(seed)
    m = LlamaForSequenceClassification(cfg).eval()
    if logits is not None:  # a constant last hidden state 8 * e_0, read by the score head
        _silence_blocks(m)
        m.model.embed_tokens.weight.zero_()
        m.model.embed_tokens.weight[:, 0] = 8.0
        m.score.weight.zero_()
        m.score.weight[:, 0] = torch.tensor(logits) / 8.0
    return _save(m, folder)


def test_seqcls_scores_the_refusal_labels(tmp_path):
    d = _seqcls_dir(tmp_path / "a", {0: "refusal", 1: "compliance"}, (1.0, 3.0))
    [v] = SequenceClassifierJudge(target=str(d), options=_opts()).judge(["q"], ["an answer"])
    assert v.label == "compliance" and v.score == pytest.approx(1 / (1 + math.exp(2)), abs=1e-5)
    # unnamed labels need a map; the map decides which side each label is on
    d2 = _seqcls_dir(tmp_path / "b", {0: "LABEL_0", 1: "LABEL_1"}, (1.0, 3.0))
    with pytest.raises(UserError, match="label map"):
        SequenceClassifierJudge(target=str(d2), options=_opts()).load()
    labels = {"refusal": ["LABEL_1"], "compliance": "LABEL_0"}
    j = SequenceClassifierJudge(target=str(d2), options=_opts(extra={"labels": labels}))
    [v2] = j.judge(["q"], ["an answer"])
    assert v2.label == "refusal" and v2.score == pytest.approx(1 / (1 + math.exp(-2)), abs=1e-5)
    assert j.describe()["parameters"]["labels"] == {"compliance": ["LABEL_0"], "refusal": ["LABEL_1"]}


@pytest.mark.parametrize("labels,match", [
    ({"refusal": ["LABEL_9"], "compliance": ["LABEL_0"]}, "not a label"),
    ({"refusal": ["LABEL_0"], "compliance": ["LABEL_0", "LABEL_1"]}, "both sides"),
    ({"refusal": ["LABEL_0"]}, "unmapped: LABEL_1"),
    ({"refusal": [0], "other": [1]}, "must be"),
])
def test_seqcls_label_map_errors(tmp_path, labels, match):
    d = _seqcls_dir(tmp_path, {0: "LABEL_0", 1: "LABEL_1"}, None)
    with pytest.raises(UserError, match=match):
        SequenceClassifierJudge(target=str(d), options=_opts(extra={"labels": labels})).load()


def test_seqcls_batches_like_one_by_one(tmp_path):
    d = _seqcls_dir(tmp_path, {0: "safe", 1: "unsafe"}, None, seed=3)
    prompts, responses = map(list, zip(*ROWS))
    b = SequenceClassifierJudge(target=str(d), options=_opts(batch_size=4)).judge(prompts, responses)
    s = [SequenceClassifierJudge(target=str(d), options=_opts(batch_size=1)).judge([p], [r])[0]
         for p, r in ROWS]
    assert [v.score for v in b] == pytest.approx([v.score for v in s], abs=1e-5)
    assert len({round(v.score, 6) for v in b}) == len(ROWS)


def test_label_names():
    assert [label_side(n) for n in ("refusal", "Refused", "safe", "benign", "harmless")] == ["refusal"] * 5
    assert [label_side(n) for n in ("compliance", "complied", "harmful", "unsafe")] == \
        ["compliance"] * 4
    assert [label_side(n) for n in ("LABEL_0", "not_harmful", "non-refusal", "nonrefusal")] == [None] * 4
