"""The Ray executor against the local one, on the same audit, side by side in one run.

Runs one audit config twice into fresh folders — ``--executor local``, then ``--executor ray``
with a local cluster of ``--workers`` actors of one CPU each — and prints the wall times, the
speed-up, whether the two summaries agree (LVS and S per model), and where Ray's time went:
the workers' busy time (the units' own wall times, from the run store's markers), the
utilisation busy / (workers x wall), and the overhead per unit, (workers x wall - busy) / units,
which holds the cluster's start, each actor's model load and the idle time the units'
dependencies force. The cluster's start alone is timed apart.

    .venv/bin/python benchmarks/bench_executor.py --model zoo/dissociated --n 16 --chunk 8

On a 2-core CPU the best case is about 2x: two actors of one thread each against one process
of two threads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def audit_config(a) -> dict:
    return {"model": a.model, "stages": ["behave", "latent"], "limit": a.n, "progress": "plain",
            "latent": {"layers": a.layers, "families": a.families.split(","), "rel_tol": 0.5},
            "executor": {"chunk": a.chunk}}


def run(cfg_path: Path, out: Path, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "latentaudit.cli", "run", "--config", str(cfg_path), "-o",
           str(out), *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return took


def headline(folder: Path) -> dict:
    s = json.loads((folder / "summary.json").read_text())
    out = {}
    for m in s["models"]:
        lat = (m.get("latent") or {}).get("families") or {}
        out[m["name"] or m["key"]] = {
            "S": (m.get("behave") or {}).get("S", {}).get("value"),
            **{f"LVS {f}": (v.get("lvs_model") or {}).get("value") for f, v in lat.items()}}
    return out


def unit_walls(folder: Path) -> list[float]:
    from latentaudit.runs.store import ResultStore

    store = ResultStore(folder / "store.sqlite")
    try:
        return [rec["wall_s"] for _, rec in store.items("executor/")]
    finally:
        store.close()


def cluster_start_s(workers: int) -> float:
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    took = time.perf_counter() - t0
    ray.shutdown()
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded:smollm2-135m")
    ap.add_argument("--n", type=int, default=16, help="prompts per set (the latent stage's too)")
    ap.add_argument("--layers", default="10")
    ap.add_argument("--families", default="pgd,noise")
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "audit.yaml"
        cfg_path.write_text(yaml.safe_dump(audit_config(a)))
        print(f"bench_executor: {a.model}, {a.n} prompts per set, layers {a.layers}, families "
              f"{a.families}, chunk {a.chunk}; {os.cpu_count()} CPUs", flush=True)
        t_local = run(cfg_path, Path(tmp) / "local", [])
        print(f"  local executor: {t_local:.0f} s", flush=True)
        t_ray = run(cfg_path, Path(tmp) / "ray", ["--executor", "ray", "--ray-workers",
                                                 str(a.workers)])
        walls = unit_walls(Path(tmp) / "ray")
        busy = sum(walls)
        start = cluster_start_s(a.workers)
        same = headline(Path(tmp) / "local") == headline(Path(tmp) / "ray")
        print(f"  ray executor ({a.workers} workers): {t_ray:.0f} s, {len(walls)} units, busy "
              f"{busy:.0f} s")
        print(f"  speed-up {t_local / t_ray:.2f}x; utilisation {busy / (a.workers * t_ray):.2f}; "
              f"overhead per unit {(a.workers * t_ray - busy) / len(walls):.1f} s "
              f"(cluster start alone {start:.1f} s)")
        print(f"  same headline: {same} {headline(Path(tmp) / 'ray')}")


if __name__ == "__main__":
    main()
