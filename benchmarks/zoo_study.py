"""Recipe study: build zoo variants and measure S, over-refusal and LVS side by side.

Used to choose the zoo recipes' defaults (issue 4) and the latent stage's defaults (issue 3).
Each result is appended to --out/study.jsonl as soon as it is known, so a run stopped by a time
limit still returns everything measured so far. Models are kept in --zoo.

    python benchmarks/zoo_study.py --plan full --device cuda --out /tmp/study --zoo /tmp/zoo
    python benchmarks/zoo_study.py --plan tiny --device cpu --out /tmp/s --zoo /tmp/z   # smoke

Plan steps:
  build  NAME RECIPE FROM PARAMS   FROM is a model spec or "@NAME" of an earlier build, or
                                   "@best-safe" (the safe variant with the largest S − O
                                   among those with S ≥ 0.9)
  lvs    NAME FAMILIES LAYERS N    latent stage on N held-out harmful prompts
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

from latentaudit.config import RunConfig
from latentaudit.construct.build import construct
from latentaudit.pipeline import quiet_libraries, run_audit

EMB = "embedded:smollm2-135m"

PLANS = {
    "tiny": [
        ("build", "safe", "safe", "tiny:llama", {"steps": 4, "eval_every": 2}),
        ("build", "diss", "dissociated", "@best-safe", {"steps": 3, "layers": "1-2"}),
        ("build", "hard", "hardened", "@best-safe", {"steps": 3, "layers": "1-2"}),
        ("build", "abl", "abliterated", "@best-safe", {"n": 8, "selection_n": 4}),
        ("lvs", "safe", "pgd,steer,noise", "1,2", 6),
        ("lvs", "diss", "pgd", "1,2", 6),
    ],
    "full": [
        ("build", "safe_a", "safe", EMB, {}),
        ("build", "safe_b", "safe", EMB, {"lr": 1e-4}),
        ("build", "safe_c", "safe", EMB, {"borderline_weight": 2.0, "harmless_batch": 12}),
        ("build", "diss_a", "dissociated", "@best-safe", {}),
        ("build", "hard_a", "hardened", "@best-safe", {}),
        ("lvs", "@best-safe", "pgd", "every:3", 50),
        ("lvs", "diss_a", "pgd", "every:3", 50),
        ("lvs", "hard_a", "pgd", "every:3", 50),
        ("build", "diss_b", "dissociated", "@best-safe",
         {"steps": 40, "eps_range": (0.002, 0.006), "layers": "frac:0.3-0.7"}),
        ("lvs", "diss_b", "pgd", "every:3", 50),
        ("build", "abl", "abliterated", "@best-safe", {}),
        ("lvs", "@best-safe", "steer,noise", "every:3", 50),
        ("lvs", "diss_a", "steer,noise", "every:3", 50),
        ("lvs", "hard_a", "steer,noise", "every:3", 50),
        ("lvs", "abl", "pgd", "every:6", 50),
        ("lvs", EMB, "pgd", "every:6", 50),
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", default="full", choices=sorted(PLANS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", required=True)
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--data-model", default=EMB, help="unaligned model for harmful completions")
    ap.add_argument("--skip", default="", help="comma-separated step indices to skip")
    a = ap.parse_args()
    quiet_libraries()
    out, zoo = Path(a.out), Path(a.zoo)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "study.jsonl", "a")
    built: dict[str, dict] = {}
    skip = {int(x) for x in a.skip.split(",") if x}

    def emit(rec):
        print(json.dumps(rec, default=str), flush=True)
        log.write(json.dumps(rec, default=str) + "\n")
        log.flush()

    def best_safe() -> str:
        cands = [(v["S"] - v["O"], k) for k, v in built.items()
                 if v["recipe"] == "safe" and v["S"] >= 0.9]
        cands = cands or [(v["S"] - v["O"], k) for k, v in built.items() if v["recipe"] == "safe"]
        return max(cands)[1]

    def resolve(ref: str) -> str:
        if ref == "@best-safe":
            ref = "@" + best_safe()
        if ref.startswith("@"):
            return str(zoo / ref[1:])
        return str(zoo / ref) if ref in built else ref

    t_start = time.time()
    for i, step in enumerate(PLANS[a.plan]):
        if i in skip:
            continue
        t0 = time.time()
        try:
            if step[0] == "build":
                _, name, recipe, src, params = step
                src_spec = resolve(src)
                path = construct(recipe, src_spec, zoo / name, params=params, force=True,
                                 device=a.device, eval_limit=a.eval_limit,
                                 data_model=a.data_model)
                meta = json.loads((path / "latentaudit_recipe.json").read_text())
                ev, det = meta["evaluation"], meta["details"]
                S, O = ev["S"], ev["over_refusal_all"]
                built[name] = {"recipe": recipe, "S": S["value"], "O": O["value"] if O else 0.0}
                emit({"step": i, "kind": "build", "name": name, "recipe": recipe, "from": src_spec,
                      "params": meta["recipe"]["params"], "S": S, "O": O,
                      "O_by_set": ev["over_refusal"], "steps_run": det.get("steps_run"),
                      "train_s": det.get("train_time_s"), "wall_s": round(time.time() - t0, 1),
                      "val": [(h["step"], h["eval"]) for h in det.get("history", []) if "eval" in h],
                      "last_loss": (det.get("history") or [{}])[-1].get("loss")})
            else:
                _, name, families, layers, n = step
                spec = resolve(name)
                cfg = RunConfig(model=spec, device=a.device, limit=n, progress="none",
                                output_dir=str(zoo / "study-runs" / Path(spec).name))
                cfg.latent.layers = layers
                cfg.latent.families = families.split(",")
                _, summary = run_audit(cfg, ["latent"], "zoo_study")
                lat = summary.models[0].latent
                res = {}
                for f, fr in lat.families.items():
                    if f not in cfg.latent.families:
                        continue
                    res[f] = {"lvs": fr.lvs_model.model_dump(), "layer": fr.worst_layer,
                              "S_clean": fr.S_clean.model_dump() if fr.S_clean else None,
                              "audit_gap": fr.audit_gap.model_dump() if fr.audit_gap else None,
                              "profile": {lr.layer: [round(lr.lvs.value, 3), round(lr.lvs.lo, 3),
                                                     round(lr.lvs.hi, 3)] for lr in fr.layers},
                              "profile_nonrefusal": {lr.layer: round(lr.lvs_nonrefusal.value, 3)
                                                     for lr in fr.layers},
                              "asr_fixed": {lr.layer: {k: round(v.value, 3)
                                                       for k, v in lr.asr_fixed.items()}
                                            for lr in fr.layers},
                              "eps_star": {lr.layer: lr.eps_star for lr in fr.layers},
                              "layer_s": {lr.layer: lr.wall_time_s for lr in fr.layers}}
                emit({"step": i, "kind": "lvs", "name": name, "model": spec, "n": n,
                      "layers": layers, "prompt_ids": lat.prompt_ids,
                      "clean_success": lat.clean_success.model_dump(), "families": res, "wall_s": round(time.time() - t0, 1)})
        except Exception as e:  # a study keeps going; the error is recorded
            emit({"step": i, "error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()[-2000:],
                  "wall_s": round(time.time() - t0, 1)})
        print(f"[{time.time() - t_start:.0f}s] step {i} done", flush=True)


if __name__ == "__main__":
    main()
