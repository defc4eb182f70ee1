"""Glue between the configuration, the stages and the run folder (the CLI stays thin)."""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from . import registry
from .config import RunConfig
from .data.sets import load_prompt_set
from .errors import UserError
from .models.fingerprint import fingerprint
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
    # peft asks transformers 5 for a renamed attribute on every get_peft_model: noise in the logs
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                            category=FutureWarning)


def model_key(lm: LoadedModel) -> str:
    """Stable key of (weights, dtype) for the store: spec slug + fingerprint."""
    fp = fingerprint(lm) or ""
    h = hashlib.sha256(f"{lm.spec}|{fp}|{lm.info.get('dtype')}".encode()).hexdigest()[:10]
    return f"{slug(lm.spec.replace(':', '-').replace('/', '-'))}-{h}"


def load_sets(cfg: RunConfig):
    b = cfg.behave
    harmful = load_prompt_set(b.harmful, cfg.data_dir, b.prompt_col, cfg.limit)
    harmless = [load_prompt_set(h, cfg.data_dir, b.prompt_col, cfg.limit) for h in b.harmless]
    return harmful, harmless


def _merge_previous(run: Run, models: list[ModelSummary]) -> list[ModelSummary]:
    """Keep what this folder's summary already holds: the stages an earlier command wrote for the
    same model (``behave`` then ``latent`` into one folder gives one summary with both), and the
    other models of a multi-model run, in their order."""
    try:
        old = Summary.model_validate_json(run.summary_path.read_text())
    except (OSError, ValueError):
        return models
    new = {m.key: m for m in models}
    for m in models:
        p = next((o for o in old.models if o.key == m.key), None)
        if p is not None:
            for stage in ("behave", "latent", "tamper", "tamper_control", "tamper_search"):
                if getattr(m, stage) is None and getattr(p, stage) is not None:
                    setattr(m, stage, getattr(p, stage))
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


def get_directions(lm: LoadedModel, run: Run, key: str, cfg: RunConfig, progress=None):
    """Refusal directions for the model ``lm`` (its key ``key``), computed once per run folder
    (safetensors artifact): its own, or with ``latent.directions_from`` those of the reference
    model, applied to ``lm`` as they are (same depth and width, checked)."""
    spec = cfg.latent.directions_from
    if not spec:
        return _directions_of(lm, run, key, cfg)
    ref = reference_model(cfg)
    _check_reference(lm, ref, spec)
    d = _directions_of(None, run, ref["key"], cfg, cached_only=True)
    if d is None:  # not in this folder yet: load the reference again, only for this
        ref_lm = load_model(spec, cfg.device, cfg.dtype, cfg.trust_remote_code)
        d = _directions_of(ref_lm, run, ref["key"], cfg)
        del ref_lm
    from .interventions.directions import RefusalDirections

    return RefusalDirections(d.directions, d.mean_harmful, d.mean_harmless,
                             {**d.meta, "directions_from": spec})


# directions_from: the reference model of each (spec, device, dtype), loaded once per process
# to validate and fingerprint it before anything else runs, then released (not held beside the
# audited model); loaded again only to compute directions a run folder does not have yet
_REFERENCES: dict[tuple, dict] = {}


def reference_model(cfg: RunConfig) -> dict:
    """{"key", "n_layers", "hidden"} of ``latent.directions_from``; a spec that does not load is
    bad input (one line, exit 2), raised before any folder is made when the pipeline calls this
    first."""
    spec = cfg.latent.directions_from
    memo = (spec, cfg.device, cfg.dtype, cfg.trust_remote_code)
    if memo not in _REFERENCES:
        try:
            ref = load_model(spec, cfg.device, cfg.dtype, cfg.trust_remote_code)
        except UserError as e:
            raise UserError(f"--directions-from: {e}") from None
        _REFERENCES[memo] = {"key": model_key(ref), "n_layers": ref.n_layers,
                             "hidden": ref.parts.hidden_size}
        del ref
    return _REFERENCES[memo]


def _check_reference(lm: LoadedModel, ref: dict, spec: str) -> None:
    if (ref["n_layers"], ref["hidden"]) != (lm.n_layers, lm.parts.hidden_size):
        raise UserError(f"--directions-from {spec}: {ref['n_layers']} layers × {ref['hidden']} "
                        f"wide, the audited model {lm.n_layers} × {lm.parts.hidden_size} "
                        "(directions apply only between models of the same shape)")


def _directions_of(lm: LoadedModel | None, run: Run, key: str, cfg: RunConfig,
                   cached_only: bool = False):
    """The refusal directions of the model ``lm`` (key ``key``) from the run folder's file when
    it was computed with these settings, else computed now and saved (``cached_only``: None
    instead of computing)."""
    from .interventions.directions import RefusalDirections, compute_directions, select_direction

    L = cfg.latent
    n, m = L.directions_n, L.selection_n
    harm = load_prompt_set(L.directions_harmful, cfg.data_dir, cfg.behave.prompt_col)
    safe = load_prompt_set(L.directions_harmless, cfg.data_dir, cfg.behave.prompt_col)
    if len(harm) < n + m or len(safe) < n + m:
        n = min(len(harm), len(safe)) * 3 // 4
        m = min(len(harm), len(safe)) - n
        if n < 2 or m < 2:
            raise UserError("refusal directions need at least 8 harmful and 8 harmless prompts")
    meta = {"model_key": key, "harmful": harm.describe(), "harmless": safe.describe(),
            "n_means": n, "n_selection": m, "system": cfg.behave.system}
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
    path = run.dir / f"directions-{key}.safetensors"
    if path.exists():
        d = RefusalDirections.load(path)
        if d.meta.get("digest") == digest:
            return d
    if cached_only or lm is None:
        return None
    d = compute_directions(lm, harm.texts[:n], safe.texts[:n], cfg.batch_size, cfg.behave.system,
                           meta={**meta, "digest": digest})
    d = select_direction(lm, d, harm.texts[n : n + m], safe.texts[n : n + m],
                         batch_size=cfg.batch_size, system=cfg.behave.system)
    d.save(path)
    return d


def calibrate_guard(lm: LoadedModel, run: Run, key: str, cfg: RunConfig, judge):
    """Coherence guard calibrated on the clean model's own greedy answers to harmless prompts."""
    from .judges.coherence import CoherenceGuard
    from .stages.behave import behave_records

    ps = load_prompt_set("builtin:harmless:test", limit=cfg.latent.calibration_n)
    recs = behave_records(lm, run.store, key, ps, "harmless", judge,
                          GenSettings(cfg.latent.max_new_tokens, cfg.batch_size, cfg.behave.system))
    guard = CoherenceGuard(system=cfg.behave.system, batch_size=cfg.batch_size)
    return guard.calibrate(lm, [r["prompt"] for r in recs], [r["response"] for r in recs])


STAGES = ("behave", "directions", "latent", "tamper")


def run_audit(cfg: RunConfig, stages: list[str], command: str, run: Run | None = None,
              name: str | None = None) -> tuple[Run, Summary]:
    """Run the named stages on one model into one run folder (``run``: an open folder shared by
    several models, left open); summary.json after each stage."""
    from .stages.latent import parse_layers, run_latent

    t0 = time.time()
    quiet_libraries()
    seed_everything(cfg.seed)
    judge = registry.create("judge", cfg.behave.judge)
    # everything that can be wrong with the input fails before the model loads or a folder is made
    if "behave" in stages:
        harmful, harmless = load_sets(cfg)
    if "latent" in stages:
        for fam in cfg.latent.families:
            registry.get("family", fam)
        if cfg.latent.eps_min >= cfg.latent.eps_max:
            raise UserError(f"--eps-min ({cfg.latent.eps_min}) must be below --eps-max ({cfg.latent.eps_max})")
        latent_set = load_prompt_set(cfg.latent.harmful, cfg.data_dir, cfg.behave.prompt_col, cfg.limit)
    if "tamper" in stages:
        from .stages.tamper import validate_tamper

        validate_tamper(cfg.tamper)
        if cfg.tamper.search_trials:
            try:
                import optuna  # noqa: F401
            except ImportError:
                raise UserError("tamper: search_trials needs optuna: pip install optuna "
                                "(or pip install 'latentaudit[search]')") from None
    needs_dirs = "directions" in stages or (
        "latent" in stages and any(registry.get("family", f).uses_directions
                                   for f in cfg.latent.families))
    if needs_dirs and cfg.latent.directions_from:
        ref = reference_model(cfg)  # a reference that does not load fails before any folder
    lm = load_model(cfg.model, cfg.device, cfg.dtype, cfg.trust_remote_code)
    if needs_dirs and cfg.latent.directions_from:
        _check_reference(lm, ref, cfg.latent.directions_from)
    if "latent" in stages:
        parse_layers(cfg.latent.layers, lm.n_layers)
    own_run = run is None
    if own_run:
        run = open_run(cfg.output_dir, cfg.model_dump(), cfg.model)
    prog = progress_factory(cfg.progress)
    try:
        key = model_key(lm)
        ms = ModelSummary(key=key, name=name, model={**lm.info, "n_layers": lm.n_layers})
        if "behave" in stages:
            ms.behave = run_behave(
                lm, run.store, key, harmful, harmless, judge,
                GenSettings(cfg.behave.max_new_tokens, cfg.batch_size, cfg.behave.system),
                seed=cfg.seed, progress_factory=prog)
            summary = _write_summary(run, cfg, command, t0, [ms])
        directions = None
        if needs_dirs:
            directions = get_directions(lm, run, key, cfg)
        if "latent" in stages:
            guard = calibrate_guard(lm, run, key, cfg, judge)
            ms.latent = run_latent(lm, run.store, key, latent_set, cfg.latent, judge, guard,
                                   directions, cfg.seed, cfg.behave.system, cfg.batch_size, prog)
        if "latent" in stages:
            summary = _write_summary(run, cfg, command, t0, [ms])
        if "tamper" in stages:
            from .stages.tamper import run_tamper

            # same generation settings as the behavioural stage, so r(0) is S on those records
            tcfg = cfg.tamper.model_copy(update={
                "seed": cfg.seed, "eval_limit": cfg.limit or cfg.tamper.eval_limit,
                "max_new_tokens": cfg.behave.max_new_tokens})
            res = run_tamper(lm, run.store, key, tcfg, judge, prog, data_dir=cfg.data_dir,
                             gen_batch_size=cfg.batch_size, system=cfg.behave.system)
            if tcfg.control == "benign":  # the control alone: never reported as the attack
                ms.tamper_control = res
            else:
                ms.tamper = res
            if "tamper_control" in stages:
                ccfg = tcfg.model_copy(update={"control": "benign"})
                ms.tamper_control = run_tamper(lm, run.store, key, ccfg, judge, prog,
                                               data_dir=cfg.data_dir, gen_batch_size=cfg.batch_size,
                                               system=cfg.behave.system)
            if tcfg.search_trials and tcfg.control == "harmful":
                from .stages.tamper import worst_case_search

                summary = _write_summary(run, cfg, command, t0, [ms])
                ms.tamper_search = worst_case_search(
                    lm, tcfg, judge, store=run.store, model_key=key, progress_factory=prog,
                    data_dir=cfg.data_dir, gen_batch_size=cfg.batch_size, system=cfg.behave.system)
        summary = _write_summary(run, cfg, command, t0, [ms])
        return run, summary
    finally:
        if own_run:
            run.close()


def run_many(acfg, command: str) -> tuple[Path, Summary]:
    """``latentaudit run``: every model of an audit config through the same stages, into one run
    folder (one store, one summary). Each (model, stage, unit) is committed as it finishes, so a
    killed run resumes where it stopped when the same command is run again."""
    from .config import audit_entries

    entries = audit_entries(acfg)
    stages = list(acfg.stages)
    base = acfg.model_dump(exclude={"models", "stages"})
    cfgs = [RunConfig.model_validate({**base, "model": e.spec}) for e in entries]
    if "latent" in stages:  # every model shares these settings: checked once, before any loads
        for fam in acfg.latent.families:
            registry.get("family", fam)
    run = open_run(acfg.output_dir, acfg.model_dump(), "audit")
    try:
        for e, c in zip(entries, cfgs):
            print(f"== {e.name}: {e.spec} ({', '.join(stages)})", file=sys.stderr, flush=True)
            _, summary = run_audit(c, stages, command, run=run, name=e.name)
        return run.dir, summary
    finally:
        run.close()


def run_behave_cli(cfg: RunConfig, command: str) -> tuple[Run, Summary]:
    return run_audit(cfg, ["behave"], command)


def command_line() -> str:
    return " ".join(["latentaudit"] + [a if " " not in a else repr(a) for a in sys.argv[1:]])


def resolve_path(p: str | None) -> Path | None:
    return Path(p).expanduser() if p else None
