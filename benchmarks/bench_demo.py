"""The demo's wall time by phase, as a benchmark (not a timed test).

Runs ``latentaudit demo`` in a scratch folder (a new zoo and run folder, so nothing is reused),
stamps every line it prints with the time since the start, and splits the run into phases: the
plan and its estimate (the speed probe), the zoo (assembled from the shipped files, or built with
``--build-zoo``), each model's audit, and the report. Prints the phases and writes them as JSON.

    .venv/bin/python benchmarks/bench_demo.py [--full] [--build-zoo] [--out bench_demo.json]

The `.venv` and install time of a fresh clone is not part of it: time `make venv` for that.
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


def phases(lines: list[tuple[float, str]], total: float) -> list[tuple[str, float]]:
    """(phase, seconds) from time-stamped output lines."""
    marks: list[tuple[str, float]] = [("plan and estimate", 0.0)]
    for t, line in lines:
        if line.startswith("zoo/") and marks[-1][0] == "plan and estimate":
            marks.append(("zoo", t))
        elif line.startswith("== "):
            marks.append((f"audit {line[3:].split(':')[0]}", t))
        elif line.startswith("writing the report"):
            marks.append(("report and table", t))
    ends = [t for _, t in marks[1:]] + [total]
    return [(name, end - start) for (name, start), end in zip(marks, ends)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--build-zoo", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="write the phases as JSON here")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-u", "-m", "latentaudit.cli", "demo", "--zoo", f"{tmp}/zoo",
               "-o", f"{tmp}/run", "--progress", "none"]
        cmd += ["--full"] * a.full + ["--build-zoo"] * a.build_zoo
        t0 = time.perf_counter()
        lines: list[tuple[float, str]] = []
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}) as p:
            assert p.stdout is not None
            for line in p.stdout:
                lines.append((time.perf_counter() - t0, line.rstrip("\n")))
        total = time.perf_counter() - t0
        if p.returncode != 0:
            sys.exit("demo failed:\n" + "\n".join(line for _, line in lines[-20:]))
    rows = phases(lines, total)
    print(f"bench_demo: {'full' if a.full else 'default'} plan, zoo "
          f"{'built' if a.build_zoo else 'assembled from the shipped files'}; {os.cpu_count()} CPUs")
    for name, s in rows:
        print(f"  {name:<28} {s:7.1f} s")
    print(f"  {'total':<28} {total:7.1f} s ({total / 60:.1f} min)")
    for _, line in lines:
        if line.startswith(("demo (", "this machine:")):
            print(f"  the demo said: {line}")
    if a.out:
        a.out.write_text(json.dumps({"phases": dict(rows), "total_s": total,
                                     "plan": "full" if a.full else "default"}, indent=2))


if __name__ == "__main__":
    main()
