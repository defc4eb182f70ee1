"""Glue between the configuration, the stages and the run folder (the CLI stays thin)."""

from __future__ import annotations

import hashlib
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import registry
from .config import RunConfig
from .data.sets import load_prompt_set
from .models.loader import LoadedModel, load_model
from .progress import progress_factory
from .runs.provenance import environment
from .runs.run import Run, open_run, slug
from .runs.summary import ModelSummary, Summary
from .stages.behave import GenSettings, run_behave


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def model_key(lm: LoadedModel) -> str:
    """Stable key of (weights, dtype) for the store: spec slug + fingerprint."""
    info = lm.info
    fp = info.get("fingerprint") or info.get("gguf_sha256") or info.get("commit") or ""
    h = hashlib.sha256(f"{lm.spec}|{fp}|{info.get('dtype')}".encode()).hexdigest()[:10]
    return f"{slug(lm.spec.replace(':', '-').replace('/', '-'))}-{h}"


def load_sets(cfg: RunConfig):
    b = cfg.behave
    harmful = load_prompt_set(b.harmful, cfg.data_dir, b.prompt_col, cfg.limit)
    harmless = [load_prompt_set(h, cfg.data_dir, b.prompt_col, cfg.limit) for h in b.harmless]
    return harmful, harmless


def run_behave_cli(cfg: RunConfig, command: str) -> tuple[Run, Summary]:
    t0 = time.time()
    quiet_libraries()
    seed_everything(cfg.seed)
    judge = registry.create("judge", cfg.behave.judge)
    harmful, harmless = load_sets(cfg)  # bad data fails before the model loads
    lm = load_model(cfg.model, cfg.device, cfg.dtype, cfg.trust_remote_code)
    run = open_run(cfg.output_dir, cfg.model_dump(), cfg.model)
    try:
        key = model_key(lm)
        behave = run_behave(
            lm, run.store, key, harmful, harmless, judge,
            GenSettings(cfg.behave.max_new_tokens, cfg.batch_size, cfg.behave.system),
            seed=cfg.seed, progress_factory=progress_factory(cfg.progress),
        )
        summary = Summary(
            run_dir=str(run.dir), command=command, config=cfg.model_dump(),
            config_hash=run.config_hash,
            provenance={**environment(), "seed": cfg.seed, "started": t0, "finished": time.time(),
                        "wall_time_s": round(time.time() - t0, 2), "resumed": run.resumed},
            models=[ModelSummary(key=key, model={**lm.info, "n_layers": lm.n_layers},
                                 behave=behave)],
        )
        run.write_json("summary.json", summary.model_dump(mode="json"))
        return run, summary
    finally:
        run.close()


def command_line() -> str:
    return " ".join(["latentaudit"] + [a if " " not in a else repr(a) for a in sys.argv[1:]])


def resolve_path(p: str | None) -> Path | None:
    return Path(p).expanduser() if p else None
