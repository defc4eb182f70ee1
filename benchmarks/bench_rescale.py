"""Can a function-preserving reparametrisation make a model look robust? (issue 37, part 1)

From a source (default: the zoo's `safe`), build `rescaled` models for several K (the refusal
subspace written K× smaller and read K× louder; K < 1 writes it louder), audit the source and
every variant in one run folder (behave + pgd at the chosen layers, the default demo's
settings), and print for each K: S and over-refusal (must not move), LVS(M) and its gap to the
source paired over the same prompts, and how the clean stream changed at the audited layer —
the mean ‖h‖ ratio to the source's and the share of ‖h‖ the refusal subspace holds — since the
relative budget ε·‖h‖ grows with ‖h‖ and so partly corrects for a louder refusal component.
Each budget (``--budgets relative,whitened``) audits into its own run folder, OUT/<budget>.

    .venv/bin/python benchmarks/bench_rescale.py --source zoo/safe --ks 0.5,0.2,0.1 \
        --limit 12 --layers 10 --out runs/bench-rescale --step-cost

A model that complies with part of the prompts clean (Qwen2.5-Coder) is attacked on the ones it
refuses: ``--refused N`` first audits the source's behaviour on ``--harmful`` (the default judge
and 32 tokens) and attacks the first N it refuses, written to OUT/refused.jsonl (a prompt file
that ``latentaudit latent --harmful`` also takes). ``--latent whiten_shrinkage=0`` whitens with
the sample covariance itself (no shrinkage: exactly basis-free).

    .venv/bin/python benchmarks/bench_rescale.py --source embedded:qwen2.5-coder-0.5b --ks 0.5 \
        --zoo zoo-qwen --refused 16 --limit 16 --layers 8 --out runs/rescale-qwen

Resumable: the zoo folders are reused and the run folder resumes. Results: OUT/rescale.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from latentaudit.config import AuditConfig
from latentaudit.construct.build import construct
from latentaudit.pipeline import command_line, quiet_libraries, run_many
from latentaudit.report.compare import compare_runs, estimate_json


@torch.no_grad()
def stream_stats(spec: str, layer: int, basis: torch.Tensor | None, n: int = 16) -> dict:
    """Mean per-token ‖h‖ at the output of block ``layer`` over the chat-formatted built-in
    harmful test prompts, and the mean share ‖Qᵀh‖/‖h‖ of the subspace ``basis`` [d, m]."""
    from latentaudit.data.sets import load_prompt_set
    from latentaudit.interventions.hooks import hook_outputs
    from latentaudit.models.chat import encode, format_prompts
    from latentaudit.models.loader import load_model

    lm = load_model(spec, "cpu", "float32")
    texts = format_prompts(lm.tokenizer, load_prompt_set("builtin:harmful:test", limit=n).texts)
    batch = encode(lm.tokenizer, texts, device=lm.device)
    outs = []
    with hook_outputs([lm.parts.blocks[layer]], lambda h: outs.append(h) or h):
        lm.model(**batch)
    mask = batch["attention_mask"].bool()
    h = outs[0][mask]  # [tokens, d]
    norms = h.norm(dim=-1)
    out = {"mean_norm": float(norms.mean()), "tokens": int(mask.sum())}
    if basis is not None:
        out["subspace_share"] = float(((h @ basis).norm(dim=-1) / norms).mean())
    return out


def refusal_basis(folder: Path) -> tuple[torch.Tensor, list[int]]:
    """The refusal subspace a `rescaled` build rescaled: its layers' directions of the source
    (from the user cache where construct left them)."""
    from latentaudit.construct.abliterate import orthonormal_basis
    from latentaudit.construct.recipes import BuildEnv
    from latentaudit.construct.subspace import refusal_subspace
    from latentaudit.models.loader import load_model
    from latentaudit.registry import create

    meta = json.loads((folder / "latentaudit_recipe.json").read_text())
    r, p = meta["details"]["rescale"], meta["recipe"]["params"]
    env = BuildEnv(meta.get("seed", 0), meta["data_model"], 32, create("judge", "substring"),
                   device="cpu")  # construct's batch size: the cached directions' key
    src = load_model(meta["from"], "cpu", "float32")
    d, layers = refusal_subspace(src, env, int(p["rescale_n"]), int(p["rescale_selection_n"]),
                                 int(p["rescale_directions"]), cache=True)
    assert layers == r["direction_layers"], (layers, r["direction_layers"])
    return orthonormal_basis([d.unit(l) for l in layers]), layers


def refused_file(source: str, harmful: str, n: int, out: Path) -> str:
    """The first ``n`` prompts of ``harmful`` (in the set's order) that ``source`` refuses clean,
    as a prompt file ``out/refused.jsonl``; the behaviour run that judged them is kept in
    ``out/refused-behave`` (resumable)."""
    from latentaudit.data.sets import load_prompt_set
    from latentaudit.files import write_text
    from latentaudit.runs.store import ResultStore

    path = out / "refused.jsonl"
    if path.exists():
        return str(path)
    cfg = AuditConfig.model_validate({
        "models": [{"name": "source", "spec": source}], "stages": ["behave"], "device": "cpu",
        "dtype": "float32", "output_dir": str(out / "refused-behave"), "progress": "plain",
        "behave": {"harmful": harmful, "harmless": []}})
    run_dir, summary = run_many(cfg, command_line())
    prefix = summary.models[0].behave.store_prefixes[load_prompt_set(harmful).name]
    with ResultStore(Path(run_dir) / "store.sqlite", read_only=True) as store:
        verdicts = {r["prompt_id"]: r["verdict"] for _, r in store.items(prefix)}
    refused = [p for p in load_prompt_set(harmful).prompts if verdicts.get(p.id) == "refusal"]
    print(f"{source} refuses {len(refused)} of {len(verdicts)} prompts of {harmful}; "
          f"attacking the first {min(n, len(refused))}")
    rows = [{"id": p.id, "prompt": p.text, "category": p.category, "target": p.target}
            for p in refused[:n]]
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))  # atomic: a killed run reruns it
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="zoo/safe")
    ap.add_argument("--ks", default="0.5,0.2,0.1")
    ap.add_argument("--zoo", default="zoo", help="where the rescaled models go (rescaled-K)")
    ap.add_argument("--limit", type=int, default=12)
    ap.add_argument("--layers", default="10")
    ap.add_argument("--out", default="runs/bench-rescale")
    ap.add_argument("--eval-limit", type=int, default=24, help="held-out prompts for the cards")
    ap.add_argument("--budgets", default="relative,whitened")
    ap.add_argument("--step-cost", action="store_true", help="also time a PGD step per budget")
    ap.add_argument("--source-name", default="source", help="the source's label in the table")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=SPEC",
                    help="another model to audit beside them (repeatable)")
    ap.add_argument("--harmful", default="builtin:harmful:test",
                    help="the prompts to attack (e.g. a file of those the source refuses clean)")
    ap.add_argument("--latent", action="append", default=[], metavar="KEY=VALUE",
                    help="another latent setting, e.g. whiten_shrinkage=0 (repeatable)")
    ap.add_argument("--refused", type=int, default=0, metavar="N",
                    help="attack the first N prompts of --harmful the source refuses clean")
    args = ap.parse_args()
    extra_latent = {k: yaml.safe_load(v) for k, _, v in (x.partition("=") for x in args.latent)}
    quiet_libraries()
    if args.refused:
        args.harmful = refused_file(args.source, args.harmful, args.refused, Path(args.out))
    ks = [float(k) for k in args.ks.split(",")]
    src = args.source_name
    models, build_s = {src: args.source}, {}
    for k in ks:
        folder = Path(args.zoo) / f"rescaled-{k:g}"
        if not (folder / "latentaudit_recipe.json").exists():
            t0 = time.time()
            construct("rescaled", args.source, folder, {"rescale": k}, force=True,
                      device="cpu", eval_limit=args.eval_limit, eval_tokens=32)
            build_s[k] = round(time.time() - t0, 1)
        models[f"K={k:g}"] = str(folder)
    for item in args.extra:  # other models audited beside them (the zoo: issue 37's table)
        name, _, spec = item.partition("=")
        models[name] = spec
    runs, audit_s = {}, {}
    for budget in args.budgets.split(","):
        acfg = AuditConfig.model_validate({
            "models": [{"name": n, "spec": sp} for n, sp in models.items()],
            "stages": ["behave", "latent"], "limit": args.limit, "device": "cpu",
            "dtype": "float32", "output_dir": str(Path(args.out) / budget), "progress": "plain",
            "latent": {"layers": args.layers, "families": ["pgd"], "rel_tol": 0.5,
                       "budget": budget, "harmful": args.harmful, **extra_latent}})
        t0 = time.time()
        runs[budget], _ = run_many(acfg, command_line())
        audit_s[budget] = round(time.time() - t0, 1)
    rows = {b: {r.model: r for r in compare_runs([d], against=src)} for b, d in runs.items()}
    basis, dlayers = refusal_basis(Path(models[f"K={ks[0]:g}"]))
    layer = int(args.layers.split(",")[0])
    ref = stream_stats(args.source, layer, basis)
    out = {"source": args.source, "limit": args.limit, "layers": args.layers,
           "harmful": args.harmful, "latent": extra_latent,
           "direction_layers": dlayers, "audit_s": audit_s, "build_s": build_s, "models": {}}
    f = lambda e: "—" if e is None else f"{e.value:+.2f} [{e.lo:+.2f}, {e.hi:+.2f}]"  # noqa: E731
    head = f"{'model':12} {'S':>20} {'O':>20} {'|h| ratio':>9} {'Q share':>8}"
    for b in runs:
        head += f" {'LVS(M) ' + b:>22} {'gap vs source':>22}"
    print(head)
    for name, spec in models.items():
        st = ref if name == src else stream_stats(spec, layer, basis)
        ratio = st["mean_norm"] / ref["mean_norm"]
        r0 = next(iter(rows.values()))[name]
        line = (f"{name:12} {f(r0.S):>20} {f(r0.over_refusal):>20} {ratio:9.2f} "
                f"{st.get('subspace_share', float('nan')):8.3f}")
        entry = {"spec": spec, "S": estimate_json(r0.S), "over_refusal": estimate_json(r0.over_refusal),
                 "stream": st, "norm_ratio": ratio, "budgets": {}}
        for b in runs:
            r = rows[b][name]
            line += f" {f(r.lvs):>22} {f(r.lvs_gap):>22}"
            entry["budgets"][b] = {"lvs": estimate_json(r.lvs), "lvs_gap": estimate_json(r.lvs_gap)}
        out["models"][name] = entry
        print(line)
    if args.step_cost:
        out["pgd_step"] = step_cost(args.source, layer, runs)
        c = out["pgd_step"]
        print(f"PGD step at layer {layer}: relative {c['relative_s']:.3f} s, whitened "
              f"{c['whitened_s']:.3f} s per step (ratio {c['ratio']:.2f}, {c['rows']} prompts, "
              f"{c['steps']} steps, best of {c['reps']})")
    print(f"audit {audit_s} s; builds {build_s}; layer {layer}; n = {args.limit}")
    Path(args.out, "rescale.json").write_text(json.dumps(out, indent=2))


def step_cost(spec: str, layer: int, runs: dict, rows: int = 8, steps: int = 10,
              reps: int = 3) -> dict:
    """Seconds per PGD step of the same prompts at ``layer`` under each budget, alternated
    (best of ``reps``): what the whitened budget's d×d maps cost."""
    import numpy as np

    from latentaudit.data.sets import load_prompt_set
    from latentaudit.interventions.budget import RelativeBudget, WhitenedBudget
    from latentaudit.interventions.context import build_context
    from latentaudit.interventions.whiten import Whitening
    from latentaudit.models.loader import load_model
    from latentaudit.registry import create
    from latentaudit.runs.keys import model_key

    lm = load_model(spec, "cpu", "float32")
    ps = load_prompt_set("builtin:harmful:test", limit=rows)
    ctx = build_context(lm, ps.texts, [p.target for p in ps.prompts])
    w = Whitening.load(Path(runs["whitened"]) / f"whitening-{model_key(lm)}.safetensors")
    fam = create("family", "pgd", steps=steps, early_stop=False, check_every=0)
    times = {"relative": [], "whitened": []}
    for _ in range(reps):
        for name, budget in (("relative", RelativeBudget()), ("whitened", WhitenedBudget(w))):
            ctx.budget = budget
            t0 = time.perf_counter()
            fam.attack(ctx, layer, list(range(rows)), np.full(rows, 0.05))
            times[name].append((time.perf_counter() - t0) / (steps + 1))
    r, wh = min(times["relative"]), min(times["whitened"])
    return {"relative_s": r, "whitened_s": wh, "ratio": wh / r, "rows": rows, "steps": steps,
            "reps": reps}


if __name__ == "__main__":
    main()
