"""Glue between the configuration, the stages and the run folder (the CLI stays thin)."""

from __future__ import annotations

import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import RunConfig
from .models.loader import load_model
from .models.memory import free_memory
from .progress import progress_factory, unit_line
from .runs import keys
from .runs.provenance import environment
from .runs.run import Run, check_run_folder, open_run, run_folder
from .runs.summary import ModelSummary, Summary
from .stages.base import Stage, StageContext
from .stages.behave import BehaveStage
from .stages.directions import DirectionsStage
from .stages.latent import LatentPrepStage, LatentStage
from .stages.tamper.stage import TamperControlStage, TamperStage


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # peft asks transformers 5 for a renamed attribute on every get_peft_model: noise in the logs
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                            category=FutureWarning)


def _merge_previous(run: Run, models: list[ModelSummary]) -> list[ModelSummary]:
    """Keep what this folder's summary already holds: the stages an earlier command wrote for the
    same model (``behave`` then ``latent`` into one folder gives one summary with both), and the
    other models of a multi-model run, in their order."""
    try:
        old = Summary.model_validate_json(run.summary_path.read_text())
    except (OSError, ValueError):
        return models
    models = [m.model_copy() for m in models]  # the caller's entries fill up as stages end
    new = {m.key: m for m in models}
    for m in models:
        p = next((o for o in old.models if o.key == m.key), None)
        if p is not None:
            for stage in ("behave", "latent", "tamper", "tamper_control", "tamper_search"):
                if getattr(m, stage) is None and getattr(p, stage) is not None:
                    setattr(m, stage, getattr(p, stage))
                    if p.settings != m.settings:  # stages of two settings in one entry
                        m.settings = None
            if m.name is None:
                m.name = p.name
    # a name this command audits under another key (the weights at its path changed, e.g. a
    # rebuilt zoo model) now means the new model: the old entry leaves the summary (its records
    # stay in the store), or one name would stand for two models in every table
    names = {m.name: m.key for m in models if m.name is not None}
    stale = [o for o in old.models if o.name in names and o.key != names[o.name]]
    for o in stale:
        print(f"summary: '{o.name}' now names {names[o.name]}; the entry of its earlier weights "
              f"({o.key}) left summary.json (its records stay in the store)",
              file=sys.stderr, flush=True)
    gone = {id(o) for o in stale}
    # each old entry in its place; a stale one's place goes to the model that now has its name
    out = [new.pop(names[o.name] if id(o) in gone else o.key, None if id(o) in gone else o)
           for o in old.models]
    return [m for m in out if m is not None] + [m for m in models if m.key in new]


def _write_summary(run: Run, cfg: RunConfig, command: str, t0: float,
                   models: list[ModelSummary]) -> Summary:
    models = _merge_previous(run, models)
    summary = Summary(
        run_dir=str(run.dir), command=command, config=run.config,
        config_hash=run.config_hash,
        provenance={**environment(), "seed": cfg.seed, "started": t0, "finished": time.time(),
                    "wall_time_s": round(time.time() - t0, 2), "resumed": run.resumed},
        models=models,
    )
    run.write_json("summary.json", summary.model_dump(mode="json"))
    return summary


# the stages by name, in the order a run takes them (AuditStage in config.py lists the same)
STAGES: dict[str, type[Stage]] = {s.name: s for s in (
    BehaveStage, DirectionsStage, LatentStage, TamperStage, TamperControlStage)}
# stages an executor's units run that users do not name
UNIT_STAGES: dict[str, type[Stage]] = {**STAGES, LatentPrepStage.name: LatentPrepStage}


_JUDGES: dict[str, Any] = {}


def load_judge(cfg) -> Any:
    """The judge of a run config, loaded once per process: a multi-model run's judge model (or
    server check) is not reloaded for every audited model. The run's --allow-pickle and
    --trust-remote-code apply to the judge's model too."""
    jcfg = cfg.judge
    extra = {"allow_pickle": cfg.allow_pickle, "trust_remote_code": cfg.trust_remote_code}
    judge = jcfg.build(**extra)  # cheap: building loads nothing
    # the loaded one is reused only for the same class and description (a plug-in registered
    # anew under the same name is a new judge)
    key = f"{type(judge).__module__}.{type(judge).__qualname__}|{judge.describe()}|{extra}"
    if key not in _JUDGES:
        judge.load()
        _JUDGES.clear()  # one judge model in memory at a time
        _JUDGES[key] = judge
    return _JUDGES[key]


def run_audit(cfg: RunConfig, stages: list[str], command: str, run: Run | None = None,
              name: str | None = None, lm=None, chunk: tuple[int, int] | None = None
              ) -> tuple[Run, Summary]:
    """Run the named stages on one model into one run folder (``run``: an open folder shared by
    several models, left open); summary.json is written as soon as each result is known.
    ``lm``: the model already loaded (an executor's worker keeps it between units); ``chunk``:
    (i, k), the latent stage's i-th of k prompt chunks only."""
    t0 = time.time()
    quiet_libraries()
    seed_everything(cfg.seed)
    steps = [UNIT_STAGES[s]() for s in stages]
    # 1. everything that can be wrong with the input fails before the model loads or a folder
    #    is made; a judge that cannot load (weights, server) included
    for st in steps:
        st.check(cfg)
    own_run = run is None
    if own_run:  # a folder another command writes into now: refused before any model loads
        check_run_folder(cfg.output_dir, cfg.model_dump(), cfg.model)
    judge = load_judge(cfg)
    # 2. the model, and what can be wrong only with this model
    if lm is None:
        lm = load_model(cfg.model, cfg.device, cfg.dtype, cfg.trust_remote_code,
                        allow_pickle=cfg.allow_pickle)
    for st in steps:
        st.check_model(cfg, lm)
    # 3. the run folder, and one context the stages share
    if own_run:
        run = open_run(cfg.output_dir, cfg.model_dump(), cfg.model, command=command)
    try:
        key = keys.model_key(lm)
        ms = ModelSummary(key=key, name=name, settings=settings_of(cfg),
                          model={**lm.info, "n_layers": lm.n_layers})

        def record(field: str, result) -> None:
            setattr(ms, field, result)
            _write_summary(run, cfg, command, t0, [ms])

        ctx = StageContext(cfg, lm, key, run, judge, record, progress_factory(cfg.progress),
                           chunk=chunk)
        # 4. the stages in turn
        for st in steps:
            st.run(ctx, getattr(cfg, st.section))
        return run, _write_summary(run, cfg, command, t0, [ms])
    finally:
        if own_run:
            run.close()


def run_many(acfg, command: str, executor=None) -> tuple[Path, Summary]:
    """``latentaudit run``: every model of an audit config through the same stages, into one run
    folder (one store, one summary). Each (model, stage, unit) is committed as it finishes, so a
    killed run resumes where it stopped when the same command is run again. ``executor``: an
    object with ``check()`` (before any folder is made) and ``run(run, entries, cfgs, stages,
    write_summary)`` that runs the units elsewhere (:mod:`latentaudit.executor`); None: here,
    model after model."""
    from .config import audit_entries

    entries = audit_entries(acfg)
    stages = list(acfg.stages)
    # only what the user set, so each model's config knows which keys were given (exclude_unset)
    base = acfg.model_dump(exclude={"models", "stages", "executor"}, exclude_unset=True)
    cfgs = [RunConfig.model_validate({**base, "model": e.spec}) for e in entries]
    for c in cfgs:  # every model's input checked before the first one starts
        for s in stages:
            STAGES[s]().check(c)
    if executor is not None:  # e.g. Ray missing or its cluster unreachable: before any folder
        executor.check()
    # the executor is not part of the run's identity: a run resumes on either
    ident = acfg.model_dump(exclude={"executor"})
    # one lock for the whole command: every model writes through this one open run
    check_run_folder(acfg.output_dir, ident, "audit")
    folder = run_folder(acfg.output_dir, ident, "audit")
    finished = ({} if executor is not None or folder is None else
                _finished(folder / "summary.json", entries, cfgs, stages))
    if len(finished) < len(entries):
        load_judge(acfg)  # a judge that cannot load stops the run before any folder is made
    run = open_run(acfg.output_dir, ident, "audit", command=command)
    try:
        if executor is not None:
            return run.dir, executor.run(run, entries, cfgs, stages, _write_summary)
        summary, t0, todo, done = None, time.time(), len(entries) - len(finished), 0
        for e, c in zip(entries, cfgs):
            if e.name in finished:
                print(f"== {e.name}: finished in this folder ({finished[e.name]}), not reloaded",
                      file=sys.stderr, flush=True)
                continue
            t1 = time.time()
            print(f"== {e.name}: {e.spec} ({', '.join(stages)})", file=sys.stderr, flush=True)
            _, summary = run_audit(c, stages, command, run=run, name=e.name)
            free_memory()  # the model just audited is dropped: its accelerator memory too
            done += 1
            print(unit_line("audit", e.name, done, todo, time.time() - t1, time.time() - t0),
                  file=sys.stderr, flush=True)
        if summary is None:  # every model had finished: the summary stands as it is
            summary = Summary.model_validate_json(run.summary_path.read_text())
        return run.dir, summary
    finally:
        run.close()


def settings_of(cfg: RunConfig) -> str:
    """The hash of the settings a model's results depend on (not where or how they show)."""
    return keys.settings_hash(cfg.model_dump(mode="json", exclude={"output_dir", "progress"}))


def _finished(summary_path: Path, entries, cfgs: list[RunConfig], stages: list[str]
              ) -> dict[str, str]:
    """The models this folder's summary already holds complete, by name → key: the key their
    files give now (read without loading the model), every stage's result, all computed under
    this command's settings. A rerun of a finished audit then reloads and replays nothing."""
    try:
        old = Summary.model_validate_json(summary_path.read_text())
    except (OSError, ValueError):
        return {}
    out: dict[str, str] = {}
    for e, c in zip(entries, cfgs):
        fields = [STAGES[s]().summary_fields(c) for s in stages]
        if any(f is None for f in fields):
            continue
        key = keys.spec_model_key(c.model, c.dtype, c.device)
        entry = next((m for m in old.models if m.key == key and m.name == e.name
                      and m.settings == settings_of(c)), None)
        if entry is not None and all(getattr(entry, f) is not None for fs in fields for f in fs):
            out[e.name] = key
    return out


def command_line() -> str:
    return " ".join(["latentaudit"] + [a if " " not in a else repr(a) for a in sys.argv[1:]])
