"""What a judge costs beside generation: rows/s of each judge and of greedy generation, in one run.

The audited model (the embedded SmolLM2-135M-Instruct by default) answers N harmful prompts
greedily; the same rows are then judged by ``substring`` and by model-backed judges whose model
is a stand-in of the same size (the embedded model saved as a checkpoint: its verdicts mean
nothing, its cost is a 135M classifier's). Prints rows/s of each, and each judge's time as a
fraction of generation's on the same rows. A real classifier (7–8B) costs roughly its size ratio
more per row; ``--judge-model PATH`` measures one.

    .venv/bin/python benchmarks/bench_judge_speed.py [--n 32] [--max-new-tokens 32]
        [--judge-model PATH] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from latentaudit.data.sets import load_prompt_set  # noqa: E402
from latentaudit.judges.base import JudgeOptions  # noqa: E402
from latentaudit.judges.spec import make_judge  # noqa: E402
from latentaudit.models.generate import greedy_generate  # noqa: E402
from latentaudit.models.loader import load_model  # noqa: E402
from latentaudit.pipeline import quiet_libraries  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded:smollm2-135m")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--judge-model", default=None, help="checkpoint folder for the model-backed "
                    "judges (default: the audited model saved as one)")
    a = ap.parse_args()
    quiet_libraries()
    lm = load_model(a.model, "cpu")
    ps = load_prompt_set("builtin:harmful:test", limit=a.n)
    prompts = [p.text for p in ps.prompts]
    gens, t_gen = timed(lambda: greedy_generate(lm, prompts, a.max_new_tokens, a.batch_size))
    responses = [g.response for g in gens]
    with tempfile.TemporaryDirectory() as tmp:
        path = a.judge_model
        if path is None:
            path = str(Path(tmp) / "standin")
            lm.model.save_pretrained(path)
            lm.tokenizer.save_pretrained(path)
        opts = JudgeOptions(device="cpu", batch_size=a.batch_size, max_response_tokens=512)
        rows = [("generation (greedy, %d new tokens)" % a.max_new_tokens, t_gen)]
        for spec in ("substring", f"classifier:{path}", f"guard:{path}"):
            judge = make_judge(spec, opts)
            _, t_load = timed(judge.load)
            judge.judge(prompts[:2], responses[:2])  # warm-up: first-call allocations
            _, t = timed(lambda: judge.judge(prompts, responses))
            label = spec if a.judge_model else spec.replace(path, "STAND-IN")
            rows.append((f"judge {label} (load {t_load:.1f} s)", t))
    print(f"{a.model}, n = {len(prompts)} rows, batch {a.batch_size}, CPU")
    print(f"{'':<60} {'rows/s':>9} {'time / generation':>18}")
    for name, t in rows:
        print(f"{name:<60} {len(prompts) / t:>9.2f} {t / t_gen:>18.3f}")


if __name__ == "__main__":
    main()
