"""The directions stage: the refusal direction of every layer (difference of means on harmful
and harmless train prompts, the layer selected by ablation on held-out prompts), saved as
safetensors in the run folder once per model and settings.

With ``latent.directions_from`` the directions are a reference model's (its base model, a
trusted sibling) of the same depth and width, applied to the audited model as they are.
"""

from __future__ import annotations

from ..data.sets import load_prompt_set
from ..errors import UserError
from ..models.loader import LoadedModel, load_model
from ..runs import keys
from ..runs.run import Run
from .base import Stage, StageContext


class DirectionsStage(Stage):
    name = "directions"
    section = "latent"

    def check(self, cfg) -> None:
        if cfg.latent.directions_from:
            reference_model(cfg)  # a reference that does not load fails before any folder

    def check_model(self, cfg, lm: LoadedModel) -> None:
        if cfg.latent.directions_from:
            check_reference(lm, reference_model(cfg), cfg.latent.directions_from)

    def run(self, ctx: StageContext, cfg) -> None:
        directions_for(ctx)  # saved in the run folder; the latent stage's summary describes them


def directions_for(ctx: StageContext):
    """The refusal directions of the context's model, once per context."""
    return ctx.once("directions", lambda: get_directions(ctx.lm, ctx.run, ctx.model_key, ctx.cfg))


def get_directions(lm: LoadedModel, run: Run, key: str, cfg):
    """Refusal directions for the model ``lm`` (its key ``key``), computed once per run folder
    (safetensors artifact): its own, or with ``latent.directions_from`` those of the reference
    model, applied to ``lm`` as they are (same depth and width, checked)."""
    from ..interventions.directions import RefusalDirections

    spec = cfg.latent.directions_from
    if not spec:
        return _directions_of(lm, run, key, cfg)
    ref = reference_model(cfg)
    check_reference(lm, ref, spec)
    d = _directions_of(None, run, ref["key"], cfg, cached_only=True)
    if d is None:  # not in this folder yet: load the reference again, only for this
        ref_lm = load_model(spec, cfg.device, cfg.dtype, cfg.trust_remote_code,
                            allow_pickle=cfg.allow_pickle)
        d = _directions_of(ref_lm, run, ref["key"], cfg)
        del ref_lm
    return RefusalDirections(d.directions, d.mean_harmful, d.mean_harmless,
                             {**d.meta, "directions_from": spec})


# the reference model of each (spec, device, dtype), loaded once per process to validate and
# fingerprint it before anything else runs, then released (not held beside the audited model);
# loaded again only to compute directions a run folder does not have yet
_REFERENCES: dict[tuple, dict] = {}


def reference_model(cfg) -> dict:
    """{"key", "n_layers", "hidden"} of ``latent.directions_from``; a spec that does not load is
    bad input (one line, exit 2)."""
    spec = cfg.latent.directions_from
    memo = (spec, cfg.device, cfg.dtype, cfg.trust_remote_code, cfg.allow_pickle)
    if memo not in _REFERENCES:
        try:
            ref = load_model(spec, cfg.device, cfg.dtype, cfg.trust_remote_code,
                             allow_pickle=cfg.allow_pickle)
        except UserError as e:
            raise UserError(f"--directions-from: {e}") from None
        _REFERENCES[memo] = {"key": keys.model_key(ref), "n_layers": ref.n_layers,
                             "hidden": ref.parts.hidden_size}
        del ref
    return _REFERENCES[memo]


def check_reference(lm: LoadedModel, ref: dict, spec: str) -> None:
    if (ref["n_layers"], ref["hidden"]) != (lm.n_layers, lm.parts.hidden_size):
        raise UserError(f"--directions-from {spec}: {ref['n_layers']} layers × {ref['hidden']} "
                        f"wide, the audited model {lm.n_layers} × {lm.parts.hidden_size} "
                        "(directions apply only between models of the same shape)")


def _directions_of(lm: LoadedModel | None, run: Run, key: str, cfg, cached_only: bool = False):
    """The refusal directions of the model ``lm`` (key ``key``) from the run folder's file when
    it was computed with these settings, else computed now and saved (``cached_only``: None
    instead of computing)."""
    from ..interventions.directions import RefusalDirections, compute_directions, select_direction

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
    digest = keys.settings_hash(meta)
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
