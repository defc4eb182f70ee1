"""How many generated tokens does the refusal verdict need? Measured on stored records.

Greedy decoding is deterministic, so the first N tokens of a stored M-token response are what an
N-token generation would have produced. This script takes every judged record of the given run
stores (behavioural records and fine-tuning-attack evaluations alike), cuts each response to its
first N tokens (tokenizer round trip), judges the cut text again with the same judge, and prints
the agreement with the full-length verdict — overall, per set role and on records that were
refusals / compliances at full length — with a 95% Wilson interval. No model is run.

    .venv/bin/python benchmarks/bench_eval_tokens.py runs/a runs/b --tokens 16,24,32,48
"""

from __future__ import annotations

import argparse
import json
import sqlite3
from collections import defaultdict
from pathlib import Path

from scipy.stats import binomtest

from latentaudit import registry


def wilson(k: int, n: int) -> tuple[float, float]:
    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    return ci.low, ci.high


def records(run_dir: Path):
    con = sqlite3.connect(f"file:{run_dir / 'store.sqlite'}?mode=ro", uri=True)
    try:
        for key, payload in con.execute("select key, payload from results where stage in "
                                        "('behave', 'tamper')"):
            p = json.loads(payload)
            if "response" in p and p.get("verdict") in ("refusal", "compliance"):
                yield key, p
    finally:
        con.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--tokens", default="16,24,32,48")
    ap.add_argument("--tokenizer", default=None,
                    help="a checkpoint folder [default: the first run's model folder]")
    ap.add_argument("--judge", default="substring")
    a = ap.parse_args()
    from transformers import AutoTokenizer

    src = a.tokenizer or json.loads((a.runs[0] / "summary.json").read_text())["models"][0]["model"]["path"]
    tok = AutoTokenizer.from_pretrained(src)
    judge = registry.create("judge", a.judge)
    cuts = [int(x) for x in a.tokens.split(",")]
    seen: dict[str, dict] = {}
    for run in a.runs:
        for key, p in records(run):
            seen.setdefault(key, p)  # one record per store key (r(0) shares behave's records)
    recs = list(seen.values())
    full = [p["verdict"] for p in recs]
    ids = [tok(p["response"], add_special_tokens=False)["input_ids"] for p in recs]
    print(f"{len(recs)} judged records from {len(a.runs)} run(s); judge {a.judge}; "
          f"full-length verdicts: {full.count('refusal')} refusal, {full.count('compliance')} compliance")
    for n in cuts:
        cut = [tok.decode(i[:n], skip_special_tokens=True) for i in ids]
        again = [v.label for v in judge.judge([p["prompt"] for p in recs], cut)]
        groups = defaultdict(lambda: [0, 0])
        for p, f, g in zip(recs, full, again):
            for name in ("all", f"role={p.get('role', 'tamper')}", f"full={f}"):
                groups[name][0] += f == g
                groups[name][1] += 1
        parts = []
        for name, (k, m) in sorted(groups.items()):
            lo, hi = wilson(k, m)
            parts.append(f"{name} {k / m:.3f} [{lo:.3f}, {hi:.3f}] n={m}")
        print(f"  first {n:>2} tokens: agreement " + "; ".join(parts))


if __name__ == "__main__":
    main()
