"""What a GPU run relies on, proven on the CPU. Out-of-memory back-off, simulated
(``LATENTAUDIT_FAULT_OOM_ABOVE``: any batch larger than N raises CUDA's out-of-memory error):
each loop halves the failing batch, finishes, stores every result once, and gives what it gives
at the smaller size. ``--dtype auto``: bfloat16 on CUDA, float32 elsewhere, resolved into the
run's identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentaudit import registry
from latentaudit.errors import UserError
from latentaudit.interventions.context import build_context, generate_perturbed
from latentaudit.models import memory
from latentaudit.models.generate import greedy_generate
from latentaudit.runs.store import ResultStore
from latentaudit.stages.behave import GenSettings, behave_records
from tests.test_behave import EveryOtherJudge, _set

PROMPTS = [f"please answer question {i} about the sea" + " and the wind" * (i % 3) for i in range(7)]


@pytest.fixture(autouse=True)
def fresh_limits(monkeypatch):
    memory.forget_limits()
    yield
    memory.forget_limits()


def oom_above(monkeypatch, n: int) -> None:
    monkeypatch.setenv(memory.FAULT_ENV, str(n))


def test_run_batches_halves_and_covers_every_item_once(monkeypatch, capsys):
    oom_above(monkeypatch, 2)
    seen: list[list[int]] = []
    memory.run_batches([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10]], seen.append, "loop", "m")
    assert [i for b in seen for i in b] == list(range(11))
    assert max(len(b) for b in seen) <= 2
    assert "out of memory at a batch of 5; continuing at 3" in capsys.readouterr().err
    # the size that fitted is kept: a later call of the same loop starts there
    later: list[list[int]] = []
    memory.run_batches([[0, 1, 2, 3]], later.append, "loop", "m")
    assert later == [[0, 1], [2, 3]]


def test_other_errors_pass_through_and_one_row_is_one_line(monkeypatch):
    def boom(b):
        raise ValueError("not memory")

    with pytest.raises(ValueError):
        memory.run_batches([[1, 2]], boom, "loop")
    oom_above(monkeypatch, 0)
    with pytest.raises(UserError, match="out of memory with a batch of one row"):
        memory.run_batches([[1, 2]], lambda b: None, "generation")


def test_real_oom_error_is_recognised():
    assert memory.is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert memory.is_oom(RuntimeError("MPS backend out of memory"))
    assert not memory.is_oom(RuntimeError("shape mismatch"))


def test_generation_backs_off_to_what_the_smaller_size_gives(tiny_lm, monkeypatch):
    want = greedy_generate(tiny_lm, PROMPTS, max_new_tokens=5, batch_size=2)
    oom_above(monkeypatch, 2)
    got = greedy_generate(tiny_lm, PROMPTS, max_new_tokens=5, batch_size=4)
    assert [g.token_ids for g in got] == [g.token_ids for g in want]


def test_behave_stores_each_record_once_under_back_off(tiny_lm, tmp_path, monkeypatch):
    oom_above(monkeypatch, 1)
    store = ResultStore(tmp_path / "s.sqlite")
    ps = _set("harm", 9)
    recs = behave_records(tiny_lm, store, "tiny", ps, "harmful", EveryOtherJudge(),
                          GenSettings(max_new_tokens=3, batch_size=4))
    assert [r["prompt_id"] for r in recs] == [p.id for p in ps.prompts]
    assert store.count("behave/") == 9 and store.count("gen/") == 9  # one answer, one verdict


def test_perturbed_generation_backs_off(tiny_lm, monkeypatch):
    ctx = build_context(tiny_lm, PROMPTS, [None] * len(PROMPTS))
    g = torch.Generator().manual_seed(0)
    deltas = [0.5 * torch.randn(len(ctx.prompt_ids[r]), tiny_lm.parts.hidden_size, generator=g)
              for r in range(len(PROMPTS))]
    deltas = [d[-3:] for d in deltas]  # the push sits on the last prompt positions
    rows = list(range(len(PROMPTS)))
    want = generate_perturbed(ctx, 1, rows, deltas, 4, batch_size=2)
    oom_above(monkeypatch, 2)
    got = generate_perturbed(ctx, 1, rows, deltas, 4, batch_size=8)
    assert [x.token_ids for x in got] == [x.token_ids for x in want]


def test_pgd_backs_off_and_attacks_each_row_as_before(tiny_lm, monkeypatch):
    targets = ["Sure, here is how"] * len(PROMPTS)
    ctx = build_context(tiny_lm, PROMPTS, targets)
    rows, eps = list(range(len(PROMPTS))), np.full(len(PROMPTS), 0.2)
    small = registry.create("family", "pgd", steps=3, batch_size=2, early_stop=False)
    want = small.candidates(ctx, 1, rows, eps, seed=0)
    oom_above(monkeypatch, 2)
    big = registry.create("family", "pgd", steps=3, batch_size=8, early_stop=False)
    got = big.candidates(ctx, 1, rows, eps, seed=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a[0].delta, b[0].delta, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_finetune_step_in_parts_is_the_same_step(tiny_lm, monkeypatch, method):
    from latentaudit.stages.tamper.config import TamperConfig
    from latentaudit.stages.tamper.finetune import TrainableCopy
    from latentaudit.training import Example, collate

    tok = tiny_lm.tokenizer
    exs = [Example(tok(p + " yes indeed")["input_ids"], 3) for p in PROMPTS[:5]]
    batch = collate(exs, tok.pad_token_id, tiny_lm.device)
    # SGD: the update is the gradient itself (Adam would magnify rounding in near-zero entries)
    cfg = TamperConfig(method=method, lr=1e-2, optimizer="sgd")
    targets = ["q_proj", "v_proj"] if method == "lora" else None

    def after_one_step() -> tuple[float, dict]:
        torch.manual_seed(0)
        t = TrainableCopy(tiny_lm, cfg, targets)
        loss = t.step(batch)
        return loss, {n: p.detach().clone() for n, p in t.model.named_parameters()
                      if p.requires_grad}

    loss_whole, whole = after_one_step()
    oom_above(monkeypatch, 2)
    loss_parts, parts = after_one_step()
    assert loss_parts == pytest.approx(loss_whole, rel=1e-5)
    for n in whole:
        torch.testing.assert_close(parts[n], whole[n], rtol=1e-4, atol=1e-6)


def test_dtype_auto_is_float32_on_the_cpu_and_bfloat16_on_cuda(monkeypatch):
    from latentaudit.config import RunConfig

    cpu = RunConfig()
    assert cpu.dtype == "float32" and cpu.model_dump()["dtype"] == "float32"  # identity as before
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert RunConfig().dtype == "bfloat16"
    assert RunConfig(device="cuda:1").dtype == "bfloat16"
    assert RunConfig(device="cpu").dtype == "float32"
    assert RunConfig(device="cuda", dtype="float16").dtype == "float16"
    c = RunConfig(device="cpu", dtype="bfloat16")
    c.dtype = "auto"
    assert c.dtype == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert RunConfig(device="cuda").dtype == "float32"


def test_loaded_model_records_attention_and_dtype(tiny_lm):
    assert tiny_lm.info["dtype"] == "float32"
    assert tiny_lm.info["attn_implementation"] == "eager"  # tiny models: eager, for exactness
