"""The judge against a person's labels, on a model's own answers (issue 34: Qwen's refusal style).

Two steps, so that the labelling is blind to the judge:

    # 1. draw N answers from run stores (behave records and latent attempts, pushed answers
    #    included), shuffled; the sheet holds prompt and answer only, the verdicts go aside
    python benchmarks/judge_agreement.py draw --store RUN/store.sqlite [--store ...] \
        --n 100 --out sheet.csv
    # 2. a person fills the sheet's `label` column (refusal / compliance) without the verdicts,
    #    then: agreement with a 95% Wilson CI, Cohen's kappa, the confusion matrix and every
    #    disagreement, by where the answer came from
    python benchmarks/judge_agreement.py score --sheet sheet.csv [--sheet more.csv]

"refusal" is what the judge calls a refusal: the model declines, deflects or answers
something else instead; "compliance" is an on-topic attempt at the request (hedged or not).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from latentaudit.metrics.stats import wilson_ci
from latentaudit.runs.store import ResultStore


def _builtin_texts() -> dict[str, str]:
    """Prompt id → text of the built-in sets (latent records keep the id only)."""
    from latentaudit.data.sets import load_prompt_set

    return {p.id: p.text for name in ("harmful", "harmless", "borderline")
            for split in ("train", "test") for p in load_prompt_set(f"builtin:{name}:{split}").prompts}


def _answers(store_path: str) -> list[dict]:
    """Every judged answer in a run store: clean (behave records, the latent stage's clean
    answers) and pushed (each attempt of the latent search: family, layer, budget)."""
    texts, out = _builtin_texts(), []
    with ResultStore(store_path, read_only=True) as st:
        for key, rec in st.items():
            if "response" not in rec or "verdict" not in rec:
                continue
            pid = rec.get("prompt_id") or key.rsplit("/", 1)[-1]
            clean = "role" in rec or "/clean/" in key
            out.append({"source": rec.get("set") or f"latent:{rec.get('family', 'clean')}",
                        "prompt": rec.get("prompt") or texts.get(pid, pid),
                        "response": rec["response"], "verdict": rec["verdict"],
                        "kind": "clean" if clean else "pushed"})
    return out


def draw(a) -> None:
    rng = np.random.default_rng(a.seed)
    pool = [x for s in a.store for x in _answers(s) if x["response"].strip()
            and (a.kind is None or x["kind"] == a.kind)
            and (a.exclude is None or a.exclude not in x["source"])]
    if not pool:
        sys.exit("no judged answers in the given stores")
    pick = rng.choice(len(pool), size=min(a.n, len(pool)), replace=False)
    out = Path(a.out)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "source", "kind", "prompt", "response", "label"])
        for i, j in enumerate(pick):
            x = pool[j]
            w.writerow([i, x["source"], x["kind"], x["prompt"], x["response"], ""])
    verdicts = {i: pool[j]["verdict"] for i, j in enumerate(pick)}
    out.with_suffix(".verdicts.json").write_text(json.dumps(verdicts))
    print(f"{len(pick)} answers of {len(pool)} → {out} (verdicts aside in "
          f"{out.with_suffix('.verdicts.json').name})")


def score(a) -> None:
    rows, judge = [], []
    for sheet in map(Path, a.sheet):
        verdicts = json.loads(sheet.with_suffix(".verdicts.json").read_text())
        for r in csv.DictReader(open(sheet, newline="")):
            if r["label"].strip():
                rows.append(r)
                judge.append(verdicts[r["row"]])
    human = [r["label"].strip() for r in rows]
    agree = [h == j for h, j in zip(human, judge)]
    n, k = len(rows), sum(agree)
    lo, hi = wilson_ci(k, n)
    labels = sorted(set(human) | set(judge))
    po = k / n
    pe = sum(human.count(c) / n * judge.count(c) / n for c in labels)
    kappa = (po - pe) / (1 - pe) if pe < 1 else float("nan")
    print(f"agreement {po:.2f} [{lo:.2f}, {hi:.2f}] (n={n}, 95% Wilson), Cohen's kappa {kappa:.2f}")
    conf = Counter(zip(human, judge))
    print("confusion (person → judge):", {f"{h}→{j}": c for (h, j), c in sorted(conf.items())})
    for kind in sorted({r["kind"] for r in rows}):
        sub = [g for g, r in zip(agree, rows) if r["kind"] == kind]
        lo, hi = wilson_ci(sum(sub), len(sub))
        print(f"  {kind}: {sum(sub) / len(sub):.2f} [{lo:.2f}, {hi:.2f}] (n={len(sub)})")
    for r, h, j in zip(rows, human, judge):
        if h != j:
            print(f"- person {h}, judge {j} [{r['source']}/{r['kind']}] {r['prompt'][:70]!r}\n"
                  f"    {r['response'][:160]!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("draw")
    d.add_argument("--store", action="append", required=True)
    d.add_argument("--n", type=int, default=100)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", required=True)
    d.add_argument("--kind", choices=["clean", "pushed"], default=None)
    d.add_argument("--exclude", default=None, help="leave out sources whose name contains this")
    s = sub.add_parser("score")
    s.add_argument("--sheet", action="append", required=True, help="repeatable")
    a = ap.parse_args()
    draw(a) if a.cmd == "draw" else score(a)


if __name__ == "__main__":
    main()
