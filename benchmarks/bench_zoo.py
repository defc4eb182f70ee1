"""Build the zoo from the embedded model and measure each recipe side by side.

For each recipe: wall time of `construct` (default settings unless overridden), then S and
over-refusal on held-out prompts (from the model card), and LVS per family on held-out harmful
prompts at the chosen layers, with 95% CIs, and each model's LVS(M) gap to `safe` paired over
prompts (the form the zoo's targets take). Writes everything to ZOO/bench_zoo.json.

    .venv/bin/python benchmarks/bench_zoo.py --zoo zoo --layers every:5 --lvs-limit 24

``--source`` builds the zoo from another model. A model aligned by its makers is its own
reference: leave ``safe`` out of ``--recipes`` and the others are built from the source and
paired against it (issue 34's study on Qwen2.5-Coder-0.5B-Instruct):

    .venv/bin/python benchmarks/bench_zoo.py --zoo zoo-qwen --source embedded:qwen2.5-coder-0.5b \
        --recipes dissociated,hardened,abliterated --layers every:2 --families pgd --lvs-limit 16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from latentaudit.config import RunConfig
from latentaudit.construct.build import construct
from latentaudit.pipeline import quiet_libraries, run_audit
from latentaudit.report.compare import compare_runs, estimate_json

ORDER = ["safe", "dissociated", "hardened", "abliterated"]


def base_evaluation(spec: str, zoo: Path, limit: int | None, data_dir: str | None) -> dict:
    """construct's held-out evaluation of a model without a card, answers kept (and resumed)
    in ZOO/base-eval.sqlite, figures in ZOO/base-eval.json."""
    from latentaudit.construct.build import evaluate_heldout
    from latentaudit.models.loader import load_model
    from latentaudit.registry import create

    out = zoo / "base-eval.json"
    if out.exists():
        return json.loads(out.read_text())
    zoo.mkdir(parents=True, exist_ok=True)
    ev = evaluate_heldout(load_model(spec, device="cpu"), create("judge", "substring"), limit, 32,
                          32, data_dir=data_dir, store_path=zoo / "base-eval.sqlite")
    out.write_text(json.dumps(ev, indent=2))
    return ev


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default="zoo")
    ap.add_argument("--source", default="embedded:smollm2-135m",
                    help="the model the zoo is built from (and the run named base)")
    ap.add_argument("--data-dir", default=None, help="standard sets for the cards (construct's)")
    ap.add_argument("--recipes", default="safe,dissociated,hardened,abliterated")
    ap.add_argument("--layers", default="every:5")
    ap.add_argument("--families", default="pgd,steer,noise")
    ap.add_argument("--lvs-limit", type=int, default=24)
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--reuse", action="store_true", help="audit existing zoo folders, do not rebuild")
    ap.add_argument("--skip-lvs", action="store_true")
    a = ap.parse_args()
    quiet_libraries()
    zoo = Path(a.zoo)
    wanted = a.recipes.split(",")
    rows = []
    models = [("base", a.source, None)]
    # safe is built from the source and the others from safe; without safe, from the source
    reference = str(zoo / "safe") if "safe" in wanted else a.source
    for recipe in ORDER:
        if recipe not in wanted:
            continue
        out = zoo / recipe
        source = a.source if recipe == "safe" else reference
        t0 = time.time()
        if not (a.reuse and (out / "config.json").exists()):
            construct(recipe, source, out, force=True, device="cpu", eval_limit=a.eval_limit,
                      data_dir=a.data_dir)
            build_s = round(time.time() - t0, 1)
        else:  # reused: the build's own wall time, as its card recorded it
            card = json.loads((out / "latentaudit_recipe.json").read_text())
            build_s = f"{card.get('wall_time_s', '?')} (card)"
        models.append((recipe, str(out), build_s))
    for name, spec, build_s in models:
        row = {"model": name, "build_s": build_s}
        card = Path(spec) / "latentaudit_recipe.json"
        if card.exists():
            ev = json.loads(card.read_text())["evaluation"]
        else:  # the source has no card: the same held-out evaluation, its answers kept
            ev = base_evaluation(spec, zoo, a.eval_limit, a.data_dir)
        row["S"], row["O"] = ev["S"], ev["over_refusal_all"]
        row["sets"] = {k: {"rate": v["rate"]} for k, v in ev.get("sets", {}).items()}
        if not a.skip_lvs:
            cfg = RunConfig(model=spec, device="cpu", limit=a.lvs_limit, progress="none",
                            output_dir=str(zoo / "bench-runs" / name))
            cfg.latent.layers = a.layers
            cfg.latent.families = a.families.split(",")
            t0 = time.time()
            _, summary = run_audit(cfg, ["latent"], "bench_zoo")
            lat = summary.models[0].latent
            row["lvs"] = {f: {"value": fr.lvs_model.value, "lo": fr.lvs_model.lo,
                              "hi": fr.lvs_model.hi, "n": fr.lvs_model.n, "layer": fr.worst_layer,
                              "profile": {lr.layer: round(lr.lvs.value, 3) for lr in fr.layers}}
                          for f, fr in lat.families.items()}
            row["latent_s"] = round(time.time() - t0, 1)
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
    ref_name = "safe" if "safe" in wanted else "base"
    if not a.skip_lvs and any(r["model"] == ref_name for r in rows):
        # the zoo's targets are paired: LVS(M) of each model minus its reference's (safe, or
        # an aligned source), on the same prompts
        runs = [str(zoo / "bench-runs" / r["model"]) for r in rows]
        for fam in a.families.split(","):
            heads = compare_runs(runs, fam, against=reference)
            for r, h in zip(rows, heads):
                if h.lvs_gap is not None:
                    r.setdefault("lvs_gap_vs_ref", {})[fam] = {
                        **estimate_json(h.lvs_gap), "reference": ref_name,
                        "definition": f"LVS(M) − LVS(M) of {ref_name}, paired over prompts "
                                      "(bootstrap CI)"}
    (zoo / "bench_zoo.json").write_text(json.dumps(rows, indent=2, default=str))
    print(f"\n{'model':<13} {'build_s':>12}  {'S':<17} {'O':<17} " + "  ".join(
        f"LVS {f:<22}" for f in a.families.split(",")))
    for r in rows:
        def f(e):
            return f"{e['value']:.2f} [{e['lo']:.2f},{e['hi']:.2f}]" if e else "-"
        lv = "  ".join(f"{f(r.get('lvs', {}).get(k)):<26}" for k in a.families.split(","))
        gaps = r.get("lvs_gap_vs_ref", {})
        lv += "  " + "  ".join(f"Δ{k} vs {g['reference']} {g['value']:+.3f} [{g['lo']:+.3f},{g['hi']:+.3f}]"
                               for k, g in gaps.items())
        print(f"{r['model']:<13} {str(r['build_s']):>12}  {f(r.get('S')):<17} {f(r.get('O')):<17} {lv}")


if __name__ == "__main__":
    main()
