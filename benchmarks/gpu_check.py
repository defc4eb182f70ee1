"""The device check: what one GPU gives latentaudit, as ratios measured in one run.

Runs offline (no downloads): a random-weight model of Llama-3-8B's shape built from its config
in bf16 (the embedded SmolLM2's tokenizer feeds it: its ids lie inside Llama-3's vocabulary) and
the embedded SmolLM2-135M. Prints:

1. PGD step time against a plain forward+backward of the same tokens (goal >= 0.6), and the
   prefix cache's speed-up against the ideal L/(L-l-1) at 25/50/75 % depth;
2. generation throughput with the latent hooks against plain ``generate`` (goal >= 0.9);
3. peak memory per unit and the batch sizes the memory sizer chose;
4. the projected time of a full-depth audit of the 8B model at default settings, built from the
   measured unit times (goal <= 30 min on one H200), each term shown;
5. the SmolLM2 default demo's wall time (``--demo``; capped by what is left of ``--budget-s``).

    .venv/bin/python benchmarks/gpu_check.py                     # on a GPU: 8B shape, demo on
    .venv/bin/python benchmarks/gpu_check.py --shape small       # the CPU: a small shape

Without CUDA the default shape is ``small`` and the demo is off: the script is exercised by the
tests on the CPU, and its figures there are not GPU figures.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_latent import step_time  # noqa: E402

from latentaudit import registry  # noqa: E402
from latentaudit.data.sets import load_prompt_set  # noqa: E402
from latentaudit.interventions.context import build_context, generate_perturbed, pad_left  # noqa: E402
from latentaudit.models import memory  # noqa: E402
from latentaudit.models.generate import greedy_config  # noqa: E402
from latentaudit.models.loader import LoadedModel, load_model  # noqa: E402
from latentaudit.pipeline import quiet_libraries  # noqa: E402

SHAPES = {
    # Meta-Llama-3-8B's config.json
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      rope_theta=500000.0, max_position_embeddings=8192),
    # the same proportions, small enough for a CPU test
    "small": dict(hidden_size=256, intermediate_size=896, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=49152,
                  max_position_embeddings=2048),
}
# default audit (latentaudit run): every layer, pgd + steer + noise, builtin:harmful:test (90
# prompts), behave on 90 + 126 + 67 prompts, the fine-tuning attack's 40 LoRA steps and 5
# evaluations of 16 prompts
N_LATENT, N_BEHAVE, FAMILIES, TAMPER_STEPS, TAMPER_EVALS, TAMPER_N = 90, 283, 3, 40, 5, 16
# evaluations per prompt and layer of the warm-started bisection: 944 / (30 layers x 16 prompts)
# in the CPU sweep of bench_latent.py (b); the cold first layer takes about twice as many
EVALS_PER_PROMPT_LAYER = 2.0


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_reset(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(dev) -> str:
    return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if dev.type == "cuda" else "n/a (CPU)"


def random_model(shape: str, tok, device: str, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**SHAPES[shape], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval().requires_grad_(False)
    return LoadedModel(model, tok, f"random:{shape}", {"dtype": str(dtype).replace("torch.", ""),
                                                        "source": "random"})


def timed(fn, dev, repeats: int = 2) -> float:
    fn()  # warm-up (kernels, allocator)
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(dev)
    return (time.perf_counter() - t0) / repeats


def pgd_part(lm, ctx, rows, dev) -> dict:
    L = lm.n_layers
    eps = np.full(len(rows), 0.02)
    out = {}
    print("\n1. PGD: step time against forward+backward; prefix cache against the ideal")
    seqs = [ctx.prompt_ids[r] + ctx.target_ids[r] for r in rows]
    ids, mask, pos = pad_left(seqs, lm.tokenizer.pad_token_id, lm.device)
    emb = lm.parts.embed(ids).detach().requires_grad_(True)

    def fwd_bwd():
        emb.grad = None
        lm.model(inputs_embeds=emb, attention_mask=mask, position_ids=pos).logits.float().mean().backward()

    peak_reset(dev)
    raw = timed(fwd_bwd, dev)
    print(f"   forward+backward of {int(mask.sum())} tokens (batch {len(rows)}): {raw * 1e3:.0f} ms, "
          f"peak {peak_gib(dev)}")
    for frac in (0.25, 0.5, 0.75):
        layer = int(round(frac * (L - 1)))
        peak_reset(dev)
        full = step_time(registry.create("family", "pgd", steps=3, prefix_cache=False), ctx, layer, rows, eps, 1)
        cached = step_time(registry.create("family", "pgd", steps=3, prefix_cache=True), ctx, layer, rows, eps, 1)
        out[frac] = cached
        ratio = raw / full
        print(f"   layer {layer:>2} ({frac:.0%}): full step {full * 1e3:.0f} ms (fwd+bwd/step "
              f"{ratio:.2f}, goal >= 0.6), cached {cached * 1e3:.0f} ms: speed-up "
              f"{full / cached:.2f}x (ideal {L / (L - layer - 1):.2f}x); peak {peak_gib(dev)}")
        if frac == 0.5:
            out["ratio"] = ratio
    return out


def generation_part(lm, ctx, rows, dev, new_tokens: int) -> dict:
    print(f"\n2. generation ({new_tokens} new tokens, batch {len(rows)}): hooks against plain generate")
    tok = lm.tokenizer
    ids, mask, _ = pad_left([ctx.prompt_ids[r] for r in rows], tok.pad_token_id, lm.device)
    cfg = greedy_config(tok, new_tokens)
    cfg.eos_token_id = None  # random weights: every row runs the full length in both arms
    layer = lm.n_layers // 2
    deltas = [torch.zeros(2, lm.parts.hidden_size) for _ in rows]

    def plain():
        with torch.inference_mode():
            lm.model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)

    def hooked():
        generate_perturbed(ctx, layer, rows, deltas, new_tokens, batch_size=len(rows))

    static = copy.deepcopy(cfg)
    static.cache_implementation = "static"

    def plain_static():
        with torch.inference_mode():
            lm.model.generate(input_ids=ids, attention_mask=mask, generation_config=static)

    peak_reset(dev)
    t_plain = timed(plain, dev)
    t_hook = timed(hooked, dev)
    n = len(rows) * new_tokens
    print(f"   plain {n / t_plain:.0f} tok/s, with hooks {n / t_hook:.0f} tok/s: ratio "
          f"{t_plain / t_hook:.2f} (goal >= 0.9); peak {peak_gib(dev)}")
    # kept only if it pays: a static cache would also have to carry the shared-prefix cache
    t_static = timed(plain_static, dev)
    print(f"   static KV cache (plain generate): {n / t_static:.0f} tok/s, "
          f"{t_plain / t_static:.2f}x the dynamic cache's")
    return {"gen_batch_s": t_hook}


def train_part(lm, ctx, rows, dev) -> float:
    from latentaudit.stages.tamper.config import TamperConfig
    from latentaudit.stages.tamper.finetune import TrainableCopy
    from latentaudit.training import Example, collate

    exs = [Example(ctx.prompt_ids[r] + ctx.target_ids[r], len(ctx.prompt_ids[r])) for r in rows[:8]]
    batch = collate(exs, lm.tokenizer.pad_token_id, lm.device)
    peak_reset(dev)
    t = TrainableCopy(lm, TamperConfig(), ["q_proj", "k_proj", "v_proj", "o_proj"])
    step = timed(lambda: t.step(batch), dev)
    print(f"   fine-tuning attack: one LoRA step on {len(exs)} pairs {step * 1e3:.0f} ms; peak {peak_gib(dev)}")
    t.close()
    return step


def projection(lm, pgd: dict, gen: dict, train_s: float, batch: int) -> float:
    L, steps = lm.n_layers, 10
    batches = math.ceil(N_LATENT / batch)
    pgd_attack = (steps + 1) * float(np.mean([pgd[f] for f in (0.25, 0.5, 0.75)]))
    per_eval = {"pgd": pgd_attack + gen["gen_batch_s"], "steer": gen["gen_batch_s"],
                "noise": gen["gen_batch_s"]}
    terms = {f"latent {f}": L * batches * EVALS_PER_PROMPT_LAYER * t for f, t in per_eval.items()}
    terms["behave"] = math.ceil(N_BEHAVE / batch) * gen["gen_batch_s"]
    terms["tamper"] = TAMPER_STEPS * train_s + TAMPER_EVALS * math.ceil(TAMPER_N / batch) * gen["gen_batch_s"]
    total = sum(terms.values())
    print(f"\n4. projected full-depth audit of {lm.spec} at default settings ({L} layers x "
          f"{FAMILIES} families x {N_LATENT} prompts, batch {batch}, {EVALS_PER_PROMPT_LAYER} "
          "evaluations per prompt and layer as in the CPU sweep):")
    for k, v in terms.items():
        print(f"   {k:<14} {v / 60:7.1f} min")
    print(f"   total          {total / 60:7.1f} min (goal <= 30 min on one H200)")
    return total


def demo_part(budget_s: float, dev) -> None:
    print(f"\n5. the SmolLM2 default demo on {dev.type} (at most {budget_s:.0f} s)")
    if budget_s < 60:
        print("   skipped: under a minute of the budget left")
        return
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "latentaudit.cli", "demo", "--zoo",
               f"{tmp}/zoo", "-o", f"{tmp}/demo", "--progress", "plain"]
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=budget_s)
            took = time.perf_counter() - t0
            tail = (r.stdout + r.stderr).strip().splitlines()[-3:]
            print(f"   exit {r.returncode} after {took:.0f} s; last lines:")
            for line in tail:
                print(f"     {line[:160]}")
        except subprocess.TimeoutExpired:
            print(f"   not finished within {budget_s:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b" if cuda else "small")
    ap.add_argument("--n", type=int, default=16, help="prompts per batch")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--demo", action=argparse.BooleanOptionalAction, default=cuda)
    ap.add_argument("--budget-s", type=float, default=450, help="wall time for the whole check")
    a = ap.parse_args()
    t0 = time.perf_counter()
    quiet_libraries()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    smol = load_model("embedded:smollm2-135m", str(dev), "auto")
    lm = random_model(a.shape, smol.tokenizer, str(dev), dtype)
    n_params = sum(p.numel() for p in lm.model.parameters())
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"gpu_check: {name}; torch {torch.__version__}; model {lm.spec} ({n_params / 1e9:.2f} B "
          f"parameters, {lm.n_layers} layers, {lm.info['dtype']}); batch {a.n}")
    ps = load_prompt_set("builtin:harmful:test", limit=a.n)
    ctx = build_context(lm, ps.texts, [p.target for p in ps.prompts])
    rows = list(range(len(ps)))

    pgd = pgd_part(lm, ctx, rows, dev)
    gen = generation_part(lm, ctx, rows, dev, a.new_tokens)
    print("\n3. memory: batch sizes")
    row = memory.generation_row_bytes(lm, max(len(r) for r in ctx.prompt_ids) + a.new_tokens)
    free = memory.free_bytes(lm.device)
    chosen = memory.fitting_batch(lm, 32, row)
    print(f"   generation: {row / 2**20:.1f} MiB per row estimated; free "
          f"{'n/a (CPU)' if free is None else f'{free / 2**30:.1f} GiB'}; batch for a configured "
          f"32: {chosen}; halved on out-of-memory during this run: "
          f"{ {k[0]: v for k, v in memory._LIMITS.items()} or 'none'}")
    train_s = train_part(lm, ctx, rows, dev)
    projection(lm, pgd, gen, train_s, a.n)
    del lm, ctx
    memory.free_memory()
    if a.demo:
        demo_part(a.budget_s - (time.perf_counter() - t0), dev)
    print(f"\ngpu_check: {time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
