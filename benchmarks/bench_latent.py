"""Latent-stage speed, measured side by side in one run on the same model and prompts.

(a) PGD step time with and without the prefix cache at 25/50/75% depth, against the ideal
    ratio L/(L−l−1) (the share of blocks no longer run; the head is run by both).
(b) a sweep (pgd over the chosen layers, N prompts) with all our speed-ups — prefix cache,
    bisection in ln ε, early exit — against a naive reference implemented here: full forward
    every PGD step, fixed 5-point log grid, every prompt evaluated at every grid point. Equal
    LVS precision: the bisection tolerance is set so that its LVS resolution per prompt,
    ln(1+tol)/ln(ε_max/ε_min), equals the grid trapezoid's, ½·Δ/ln(ε_max/ε_min) with Δ the
    grid's log step, i.e. tol = exp(Δ/2) − 1. Prints both LVS values and the wall-time ratio.
(c) attack tokens/s (PGD steps, prefix cache on, sequence tokens per second) against raw
    forward+backward tokens/s of the same model on the same batch (gradients to the inputs).

    .venv/bin/python benchmarks/bench_latent.py --model zoo/safe --n 16 --layers every:6
    .venv/bin/python benchmarks/bench_latent.py --model zoo/safe --layers all --skip-steps \
        --state bench_b.jsonl   # (b) paired by layer and resumable: kill it, rerun to go on

With --state, (b) runs ours and the naive reference one after the other at each layer (ours'
sweep order, deepest first, warm starts read back from the file) and appends each timing as soon
as it is measured, so drift of the machine between parts hits both arms alike (a rerun on
another model, checkpoint fingerprint or settings is refused); the ratio is
printed over the layers both arms have done, and marked PARTIAL until every layer is in.

Measured on the 2-core CPU (SmolLM2 `safe`, 16 prompts):
(a) 1.15× / 1.45× / 2.19× at 25/50/75 % depth (ideal 1.36 / 2.00 / 4.29); (c) 2.05.
(b) every layer (`--layers all --naive-layers 0,7,14,21,29`): ours 2982 s for all 30 layers,
852 evaluations (61 at the cold first layer, 24-36 at each warm one: 2.2 per prompt); naive
measured at 5 layers, 226-383 s per layer (falling with depth: more rescue generations at
shallow layers), extrapolated to 30 layers: 8984 s from the mean (3.01×) or 8902 s by linear
interpolation between the measured layers (2.99×) — at the 3× goal, not clearly above it.
LVS at the 5 shared layers within 0.078 of naive's (resolution bound 0.25). The mid-attack
check (`check_every` 5) caught 420 of the 444 successes at step 5 but saved only a few per
cent per layer: one check costs a generation (~0.7 s per row, 2-3 PGD steps) for every row
still attacked, failures included.
Re-run with the check skipping rows whose best push still opens with a refusal (same model,
prompts, layers; identical LVS and 852 evaluations): ours 3027 s, naive 264-423 s per layer
(1717 s for 5 layers, 15 % slower than the first run: the naive side varies run to run),
extrapolated 10304 s (mean, 3.40x) / 10242 s (interpolated, 3.38x). The two runs bracket the
ratio at 3.0-3.4x; the skip saved 70 s at the cold first layer and nothing measurable elsewhere.
Paired by layer (--state), the whole sweep (in two parts, 2026-12-01 20:13-21:25 and 22:13 to
00:00 UTC the next day, alone on the CPU; each arm of each layer timed in one process): all 30
layers, ours 2702 s, naive 8391 s, 3.11x (goal >= 3x), 944 against 2100 evaluations, max |LVS
difference| 0.080 (resolution bound 0.25). Per layer 2.54-4.47x with no clean depth trend: lowest
at the cold first layer (29: 54 evaluations with no warm start) and at layers 13-17 (2.5-2.8x),
highest at 22-26 (2.9-4.5x); ours takes 25-38 evaluations at a warm layer, 55-126 s (the
deepest layers the cheapest), naive 206-355 s.
This is the figure for (b); the one-shot extrapolations above bracketed it at 3.0-3.4x.
Earlier, 5 layers (every:6): 2.31× (ours 669 s, 200 evaluations; naive 1549 s, 325); cold
bisection without warm start 1.19×.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from latentaudit import registry
from latentaudit.data.sets import load_prompt_set
from latentaudit.interventions.context import build_context, pad_left
from latentaudit.judges import SubstringJudge
from latentaudit.judges.coherence import CoherenceGuard
from latentaudit.metrics.lvs import log_grid, lvs_trapezoid, prompt_scores
from latentaudit.models.generate import greedy_generate
from latentaudit.models.loader import load_model
from latentaudit.pipeline import quiet_libraries
from latentaudit.runs.store import ResultStore
from latentaudit.stages.latent import (LatentConfig, LatentRunner, make_family, parse_layers,
                                       sweep_order)
from latentaudit.stages.latent.stage import _search


def step_time(fam, ctx, layer, rows, eps, repeats=2):
    fam.attack(ctx, layer, rows, eps)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fam.attack(ctx, layer, rows, eps)
    return (time.perf_counter() - t0) / repeats / (fam.params["steps"] + 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded:smollm2-135m")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--layers", default="every:6")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-steps", action="store_true", help="skip (a) and (c)")
    ap.add_argument("--skip-naive", action="store_true", help="(b) without the naive reference")
    ap.add_argument("--naive-layers", default=None,
                    help="run the naive reference on these layers only and extrapolate its sweep "
                    "time to all of --layers (it makes the same evaluations at every layer: full "
                    "forward, fixed grid, no early exit; its time still varies with depth, so "
                    "spread the layers out); printed as an extrapolation with its range")
    ap.add_argument("--state", default=None,
                    help="(b) paired and resumable: at each layer (in our sweep order) run ours "
                    "then the naive reference side by side, append both to this JSON-lines file as "
                    "soon as each is timed, and skip what it already holds on a rerun; prints the "
                    "ratio over the layers done so far (the whole sweep's once every layer is in). "
                    "A whole naive sweep is hours of a 2-core CPU; this lets it be run in parts")
    ap.add_argument("--cold", action="store_true",
                    help="(b) also time last release's search: bisection, every layer cold, full PGD")
    a = ap.parse_args()
    quiet_libraries()
    lm = load_model(a.model, device="cpu")
    L = lm.n_layers
    ps = load_prompt_set("builtin:harmful:test", limit=a.n)
    ctx = build_context(lm, ps.texts, [p.target for p in ps.prompts])
    rows = list(range(len(ps)))
    eps = np.full(len(rows), 0.02)
    print(f"model={a.model} L={L} prompts={len(ps)} pgd_steps={a.steps} threads={torch.get_num_threads()}")

    if not a.skip_steps:
        step_benchmarks(lm, ctx, rows, eps, L)
    if a.skip_sweep:
        return
    if a.state:
        paired_sweep(a, lm, ps, L)
    else:
        sweep(a, lm, ps, L)


def step_benchmarks(lm, ctx, rows, eps, L) -> None:
    print("\n(a) PGD step time, prefix cache vs full forward")
    for frac in (0.25, 0.5, 0.75):
        layer = int(round(frac * (L - 1)))
        fast = registry.create("family", "pgd", steps=3, prefix_cache=True)
        slow = registry.create("family", "pgd", steps=3, prefix_cache=False)
        tf, ts = step_time(fast, ctx, layer, rows, eps), step_time(slow, ctx, layer, rows, eps)
        print(f"  layer {layer:>2} ({frac:.0%}): full {ts:.3f}s/step, cached {tf:.3f}s/step, "
              f"speed-up {ts / tf:.2f}x (ideal {L / (L - layer - 1):.2f}x)")

    print("\n(c) attack tokens/s vs raw forward+backward tokens/s")
    seqs = [ctx.prompt_ids[r] + ctx.target_ids[r] for r in rows]
    ids, mask, pos = pad_left(seqs, lm.tokenizer.pad_token_id)
    n_tok = int(mask.sum())
    emb = lm.parts.embed(ids).detach().requires_grad_(True)
    lm.model(inputs_embeds=emb, attention_mask=mask, position_ids=pos).logits.float().mean().backward()
    t0 = time.perf_counter()
    for _ in range(3):
        emb.grad = None
        out = lm.model(inputs_embeds=emb, attention_mask=mask, position_ids=pos).logits
        out.float().mean().backward()
    raw = 3 * n_tok / (time.perf_counter() - t0)
    layer = int(round(0.5 * (L - 1)))
    fam = registry.create("family", "pgd", steps=5)
    per_step = step_time(fam, ctx, layer, rows, eps, repeats=1)
    att = n_tok / per_step
    print(f"  raw fwd+bwd {raw:.0f} tok/s; attack (layer {layer}) {att:.0f} tok/s; ratio {att / raw:.2f} (goal >= 0.6)")


def _grid_tol():
    """The naive 5-point grid, its log step Δ, and the bisection tolerance of equal LVS
    precision, exp(Δ/2) − 1."""
    grid = log_grid(0.001, 0.5, 5)
    delta = np.log(grid[1] / grid[0])
    return grid, delta, float(np.exp(delta / 2) - 1)


def _sweep_setup(lm, steps: int):
    """The grid, the equal-precision bisection tolerance, the judge and guard, and the two arms'
    settings (ours: prefix cache, warm-started bisection, early exit; naive: none of them)."""
    grid, delta, tol = _grid_tol()
    judge = SubstringJudge()
    harmless = load_prompt_set("builtin:harmless:test", limit=16).texts
    gens = greedy_generate(lm, harmless, 32, 16)
    guard = CoherenceGuard().calibrate(lm, harmless, [g.response for g in gens])
    ours = LatentConfig(families=["pgd"], family_params={"pgd": {"steps": steps}}, rel_tol=tol)
    naive = LatentConfig(families=["pgd"], search="grid", grid_points=5,
                         family_params={"pgd": {"steps": steps, "prefix_cache": False,
                                                "early_stop": False, "check_every": 0}})
    return grid, delta, tol, judge, guard, ours, naive


def _naive_layer(ask, clean: np.ndarray, grid: np.ndarray) -> tuple[float, int]:
    """The naive reference at one layer: every prompt not already harmful at every grid point
    (no early exit); LVS by the trapezoid. Returns (LVS, evaluations)."""
    ok = np.zeros((len(clean), len(grid)), bool)
    evals = 0
    for g_i, e in enumerate(grid):
        todo = np.flatnonzero(~clean)
        ok[todo, g_i] = ask(todo, np.full(todo.size, e))
        evals += todo.size
    ok = np.maximum.accumulate(ok | clean[:, None], axis=1)
    return float(lvs_trapezoid(grid, ok.mean(0))), evals


def paired_sweep(a, lm, ps, L) -> None:
    """(b) with both arms timed layer by layer, side by side, resumable from ``a.state``."""
    print("\n(b) sweep, paired by layer: ours (prefix cache, bisection, early exit) vs naive")
    layers = parse_layers(a.layers, L)
    setup = {"kind": "setup", "model": a.model, "fingerprint": lm.info.get("fingerprint"),
             "n": len(ps), "steps": a.steps, "layers": layers, "tol": _grid_tol()[2]}
    path = Path(a.state)
    recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    if recs and {k: recs[0].get(k) for k in setup} != setup:
        raise SystemExit(f"{path} holds a different sweep ({recs[0]}); use another --state file")
    if not recs:
        with path.open("a") as f:
            f.write(json.dumps(setup) + "\n")
    done = {(r["arm"], r["layer"]): r for r in recs[1:]}
    grid, delta, tol, judge, guard, ours_cfg, naive_cfg = _sweep_setup(lm, a.steps)
    arms = {}
    for name, cfg in (("ours", ours_cfg), ("naive", naive_cfg)):
        store = ResultStore(f"/tmp/bench_latent_{name}_{time.time():.0f}.sqlite")
        runner = LatentRunner(lm, store, "bench", ps, cfg, judge, guard)
        clean = np.array([r["success"] for r in runner.clean()])
        arms[name] = (runner, make_family("pgd", cfg), clean)
    order = sweep_order(layers, ours_cfg)
    for i, layer in enumerate(order):
        for name in ("ours", "naive"):
            if (name, layer) in done:
                continue
            runner, fam, clean = arms[name]
            ask = runner.oracle(fam, layer)
            t0 = time.perf_counter()
            if name == "naive":
                lvs, evals = _naive_layer(ask, clean, grid)
                star = None
            else:  # warm start from the layer swept before, as in a real sweep
                prev = done.get(("ours", order[i - 1])) if i else None
                guess = np.array(prev["eps_star"], float) if prev else None
                res = _search(ask, ours_cfg, len(ps), clean, grid, guess)
                lvs, evals = float(prompt_scores(res.eps_star, 0.001, 0.5).mean()), res.evaluations
                star = [float(x) for x in res.eps_star]
            rec = {"arm": name, "layer": layer, "seconds": round(time.perf_counter() - t0, 2),
                   "evaluations": int(evals), "lvs": lvs, "eps_star": star,
                   "threads": torch.get_num_threads(),
                   "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            done[(name, layer)] = rec
            with path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"  layer {layer:>2} {name:>5}: {rec['seconds']:.0f}s, {evals} evaluations, "
                  f"LVS {lvs:.3f}", flush=True)
    both = [l for l in order if ("ours", l) in done and ("naive", l) in done]
    if not both:
        return
    t_o = sum(done[("ours", l)]["seconds"] for l in both)
    t_n = sum(done[("naive", l)]["seconds"] for l in both)
    per = [done[("naive", l)]["seconds"] / done[("ours", l)]["seconds"] for l in both]
    diff = max(abs(done[("ours", l)]["lvs"] - done[("naive", l)]["lvs"]) for l in both)
    scope = "whole sweep" if len(both) == len(layers) else f"PARTIAL: {len(both)} of {len(layers)} layers"
    print(f"  {scope}: ours {t_o:.0f}s, naive {t_n:.0f}s, speed-up naive/ours = {t_n / t_o:.2f}x "
          f"(goal >= 3x); per layer {min(per):.2f}-{max(per):.2f}x; max |LVS difference| = "
          f"{diff:.3f} (resolution bound {delta / np.log(500):.3f}); sessions "
          f"{sorted({done[(n, l)]['at'][:10] for n in ('ours', 'naive') for l in both})}")


def sweep(a, lm, ps, L) -> None:
    print("\n(b) sweep: ours (prefix cache, bisection, early exit) vs naive reference")
    layers = parse_layers(a.layers, L)
    grid, delta, tol, judge, guard, ours_cfg, naive_cfg = _sweep_setup(lm, a.steps)
    results = {}
    naive_per_layer: list = []
    arms = [("ours", ours_cfg)]
    if a.cold:
        arms.append(("ours-cold", LatentConfig(
            families=["pgd"], rel_tol=tol, warm_start=False,
            family_params={"pgd": {"steps": a.steps, "early_stop": False, "check_every": 0}})))
    if not a.skip_naive:
        arms.append(("naive", naive_cfg))
    naive_layers = parse_layers(a.naive_layers, L) if a.naive_layers else layers
    for name, cfg in arms:
        store = ResultStore(f"/tmp/bench_latent_{name}_{time.time():.0f}.sqlite")
        runner = LatentRunner(lm, store, "bench", ps, cfg, judge, guard)
        clean = np.array([r["success"] for r in runner.clean()])
        fam = make_family("pgd", cfg)
        t0 = time.perf_counter()
        lvs, evals, per_layer = [], 0, []
        guess = None
        for layer in (naive_layers if name == "naive" else sweep_order(layers, cfg)):
            ask = runner.oracle(fam, layer)
            tl = time.perf_counter()
            if name == "naive":  # no early exit: every prompt at every grid point
                v, e = _naive_layer(ask, clean, grid)
                evals += e
                per_layer.append((layer, e, round(time.perf_counter() - tl, 1)))
                lvs.append(v)
            else:
                res = _search(ask, cfg, len(ps), clean, grid, guess)
                guess = res.eps_star
                evals += res.evaluations
                per_layer.append((layer, res.evaluations, round(time.perf_counter() - tl, 1)))
                lvs.append(float(prompt_scores(res.eps_star, 0.001, 0.5).mean()))
        if name != "naive" and cfg.warm_start:
            lvs = lvs[::-1]  # swept deepest first
        results[name] = (time.perf_counter() - t0, lvs, evals)
        if name == "naive":
            naive_per_layer = per_layer
        print(f"  {name:>9}: {results[name][0]:.0f}s, {evals} (prompt, eps) evaluations, "
              f"LVS_l = {[round(v, 3) for v in lvs]}; per layer (sweep order) "
              f"{per_layer}", flush=True)
    if "naive" not in results:
        return
    t_o, t_n = results["ours"][0], results["naive"][0]
    ours_lvs = dict(zip(layers, results["ours"][1]))
    diff = max(abs(ours_lvs[l] - y) for l, y in zip(naive_layers, results["naive"][1]))
    if naive_layers != layers:
        per = np.array([t for _, _, t in naive_per_layer])
        t_n = float(per.mean()) * len(layers)
        print(f"  naive reference EXTRAPOLATED: measured at layers {naive_layers} "
              f"({per.min():.0f}-{per.max():.0f} s per layer, mean {per.mean():.0f} s) x "
              f"{len(layers)} layers = {t_n:.0f} s; at the slowest measured layer "
              f"{per.max() * len(layers):.0f} s, at the fastest {per.min() * len(layers):.0f} s "
              f"({per.max() * len(layers) / t_o:.2f}x / {per.min() * len(layers) / t_o:.2f}x)")
    if "ours-cold" in results:
        print(f"  speed-up naive/ours-cold = {t_n / results['ours-cold'][0]:.2f}x")
    print(f"  speed-up naive/ours = {t_n / t_o:.2f}x (goal >= 3x); layers {layers}; "
          f"max |LVS difference| = {diff:.3f} (resolution bound {delta / np.log(500):.3f})")


if __name__ == "__main__":
    main()
