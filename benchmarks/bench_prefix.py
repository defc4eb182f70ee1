"""The shared chat-template prefix, computed once per batch, against whole rows, in one run.

Chat prompts share their opening (SmolLM2: the template's default system prompt, about 22 of a
~55-token prompt). Two places run it once per batch instead of once per row:

1. greedy generation (behave, the zoo's evaluations and retain answers): the prefix's keys and
   values once per call, rows laid out prefix | padding | suffix;
2. the training loss (the zoo's unperturbed terms, the fine-tuning attack): the prefix once per
   batch with gradients, the rows' suffixes attending to it.

Each part alternates the two paths ``--repeats`` times (drift cancels) on the same prompts and
prints wall time, tokens/s, the speed-up, and the agreement (generations token-for-token
identical; training loss and LoRA gradients, max relative difference).

    .venv/bin/python benchmarks/bench_prefix.py [--n 64] [--batch-size 32] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from latentaudit.construct.data import refusal_for
from latentaudit.data.sets import load_prompt_set
from latentaudit.models.chat import format_prompts
from latentaudit.models.generate import greedy_generate, shared_prefix_length
from latentaudit.models.loader import load_model
from latentaudit.pipeline import quiet_libraries
from latentaudit.training import Example, collate, common_prefix_length, encode_pair, token_nll


def bench_generation(lm, prompts, a) -> list:
    tok = lm.tokenizer
    rows = tok(format_prompts(tok, prompts), add_special_tokens=False)["input_ids"]
    greedy_generate(lm, prompts[:2], 4, 2)  # warm-up
    t = {True: 0.0, False: 0.0}
    n_new = {True: 0, False: 0}
    gens = {}
    for _ in range(a.repeats):
        for share in (False, True):
            t0 = time.perf_counter()
            gens[share] = greedy_generate(lm, prompts, a.max_new_tokens, a.batch_size,
                                          share_prefix=share)
            t[share] += time.perf_counter() - t0
            n_new[share] += sum(g.n_new_tokens for g in gens[share])
    same = sum(x.token_ids == y.token_ids for x, y in zip(gens[True], gens[False]))
    print(f"## generation: prompts={len(prompts)} batch={a.batch_size} "
          f"max_new_tokens={a.max_new_tokens} repeats={a.repeats}")
    print(f"shared prefix {shared_prefix_length(rows)} tokens of a mean prompt of "
          f"{sum(map(len, rows)) / len(rows):.1f}")
    for share, name in ((False, "whole rows"), (True, "shared prefix")):
        print(f"{name:>13}: {t[share]:.1f}s, {n_new[share] / t[share]:.1f} new tok/s")
    print(f"speed-up = {t[False] / t[True]:.2f}x; identical generations {same}/{len(prompts)}")
    return gens[False]


def bench_training(lm, items, harmful_ids, answers, a) -> None:
    from peft import LoraConfig, get_peft_model

    tok = lm.tokenizer
    ex = []
    for p, g in zip(items, answers):  # harmful → a refusal; harmless → the model's own answer
        target = refusal_for(p.id) if p.id in harmful_ids else g.response
        pi, ci = encode_pair(tok, p.text, target, max_completion_tokens=48)
        ex.append(Example(pi + ci, len(pi)))
    model = get_peft_model(lm.model, LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM",
                                                target_modules="all-linear"))
    model.train()
    bs = a.train_batch
    batches = [collate(ex[j:j + bs], tok.pad_token_id, "cpu") for j in range(0, len(ex), bs)]
    batches = [b for b in batches if b["input_ids"].shape[0] > 1][: a.train_batches]
    n_tok = sum(int(b["attention_mask"].sum()) for b in batches)
    shared = sum(common_prefix_length(b) * (b["input_ids"].shape[0] - 1) for b in batches)

    def run(share: bool):
        model.zero_grad()
        losses = []
        for b in batches:
            s, n = token_nll(model, b, share_prefix=share)
            loss = s.sum() / n.sum()
            loss.backward()
            losses.append(float(loss.detach()))
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return losses, grads

    run(True)  # warm-up
    t = {True: 0.0, False: 0.0}
    out = {}
    for _ in range(a.repeats):
        for share in (False, True):
            t0 = time.perf_counter()
            out[share] = run(share)
            t[share] += time.perf_counter() - t0
    (la, ga), (lb, gb) = out[False], out[True]
    dl = max(abs(x - y) / abs(x) for x, y in zip(la, lb))
    dg = float((ga - gb).norm() / ga.norm())
    print(f"## training (LoRA r16, forward+backward): {len(batches)} batches of {bs}, "
          f"{n_tok} tokens a pass, {shared} of them run once instead of per row, "
          f"repeats={a.repeats}")
    for share, name in ((False, "whole rows"), (True, "shared prefix")):
        print(f"{name:>13}: {t[share]:.1f}s, {a.repeats * n_tok / t[share]:.1f} tok/s "
              f"(all tokens counted)")
    print(f"speed-up = {t[False] / t[True]:.2f}x; max relative loss difference {dl:.1e}, "
          f"gradient {dg:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded:smollm2-135m")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--train-batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    quiet_libraries()
    torch.manual_seed(0)
    lm = load_model(a.model, device="cpu")
    harmful = load_prompt_set("builtin:harmful:test", limit=a.n // 2).prompts
    harmless = load_prompt_set("builtin:harmless:test", limit=a.n - a.n // 2).prompts
    items = [p for pair in zip(harmful, harmless) for p in pair]
    prompts = [p.text for p in items]
    print(f"threads={torch.get_num_threads()}")
    answers = bench_generation(lm, prompts, a)
    bench_training(lm, items, {p.id for p in harmful}, answers, a)


if __name__ == "__main__":
    main()
