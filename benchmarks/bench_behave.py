"""Behavioural stage vs plain batched ``model.generate`` on the same prompts, in one run.

Both decode the same prompts greedily with the same batch size and new-token count; ours sorts
prompts by length (less padding) and decodes into per-prompt records. Prints new tokens/s of
each and the ratio ours/plain (goal ≥ 0.9), alternating the two twice to cancel drift.

    .venv/bin/python benchmarks/bench_behave.py [--n 32] [--batch-size 16] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import time

import torch

from latentaudit.data.sets import load_prompt_set
from latentaudit.models.chat import format_prompts
from latentaudit.models.generate import greedy_config, greedy_generate
from latentaudit.models.loader import load_model
from latentaudit.pipeline import quiet_libraries


def plain_generate(lm, prompts, max_new_tokens, batch_size):
    tok = lm.tokenizer
    texts = format_prompts(tok, prompts)
    cfg = greedy_config(tok, max_new_tokens)
    n_new = 0
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            b = tok(texts[i : i + batch_size], return_tensors="pt", padding=True,
                    add_special_tokens=False)
            out = lm.model.generate(**b, generation_config=cfg)
            new = out[:, b["input_ids"].shape[1]:]
            n_new += int((new != tok.pad_token_id).sum())
    return n_new


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded:smollm2-135m")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    quiet_libraries()
    lm = load_model(a.model, device="cpu")
    harmful = load_prompt_set("builtin:harmful:test", limit=a.n // 2).texts
    harmless = load_prompt_set("builtin:harmless:test", limit=a.n - a.n // 2).texts
    prompts = [p for pair in zip(harmful, harmless) for p in pair]  # mixed lengths, input order
    greedy_generate(lm, prompts[:2], 4, 2)  # warm-up
    t_ours, t_plain, tok_ours, tok_plain = 0.0, 0.0, 0, 0
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        gens = greedy_generate(lm, prompts, a.max_new_tokens, a.batch_size)
        t_ours += time.perf_counter() - t0
        tok_ours += sum(g.n_new_tokens for g in gens)
        t0 = time.perf_counter()
        tok_plain += plain_generate(lm, prompts, a.max_new_tokens, a.batch_size)
        t_plain += time.perf_counter() - t0
    r_ours, r_plain = tok_ours / t_ours, tok_plain / t_plain
    print(f"prompts={len(prompts)} batch={a.batch_size} max_new_tokens={a.max_new_tokens} "
          f"repeats={a.repeats} threads={torch.get_num_threads()}")
    print(f"ours : {tok_ours} new tokens in {t_ours:.1f}s = {r_ours:.1f} tok/s")
    print(f"plain: {tok_plain} new tokens in {t_plain:.1f}s = {r_plain:.1f} tok/s")
    print(f"throughput ratio ours/plain = {r_ours / r_plain:.2f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
