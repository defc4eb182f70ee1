"""``latentaudit construct``: build one zoo model and save it as a normal HF checkpoint
(safetensors + tokenizer + README.md model card + latentaudit_recipe.json)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from .. import registry
from .._version import __version__
from ..data.phrasing import phrasing_style
from ..data.sets import load_prompt_set
from ..errors import UserError
from ..files import staged_dir
from ..models.embedded import DEFAULT_MODEL
from ..models.fingerprint import info_fingerprint
from ..models.loader import load_model
from ..runs.store import ResultStore
from ..metrics.stats import estimate_mean
from ..stages.behave import GenSettings, behave_records, refusal_flags, run_behave
from .recipes import BuildEnv
from .ship import ADAPTER_FILE, CARD_FILE, assemble, save_adapter, shipped_card, shipped_dir
from .train import ADAPTER_KEY


# the sets a card measures: the built-in test splits always, the standard sets when a data
# folder is given (none of them is trained on: extra_harmful drops prompts equal to a test one)
BUILTIN_EVAL = (("builtin:harmful:test", "harmful"), ("builtin:harmless:test", "harmless"),
                ("builtin:borderline:test", "harmless"))
STANDARD_EVAL = (("advbench", "harmful"), ("harmbench", "harmful"), ("jailbreakbench", "harmful"),
                 ("xstest", "harmless"))


def evaluate_heldout(lm, judge, limit: int | None, max_new_tokens: int, batch_size: int,
                     seed: int = 0, data_dir: str | Path | None = None,
                     store_path: str | Path | None = None) -> dict:
    """S and over-refusal on sets the recipe never trained on: the built-in test splits (pooled
    as ``S`` / ``over_refusal`` as before) and, with ``data_dir``, AdvBench, HarmBench,
    JailbreakBench and XSTest's safe prompts; every set also by category and by phrasing style
    (``sets``). Answers go to a throw-away store, or to ``store_path`` (kept, and resumed)."""
    specs = BUILTIN_EVAL + (STANDARD_EVAL if data_dir else ())
    loaded = [(load_prompt_set(s, data_dir, limit=limit), role) for s, role in specs]
    settings = GenSettings(max_new_tokens, batch_size)
    with tempfile.TemporaryDirectory() as d:
        store = ResultStore(Path(store_path) if store_path else Path(d) / "s.sqlite")
        try:
            b = run_behave(lm, store, "construct-eval", loaded[0][0], [ps for ps, _ in loaded[1:3]],
                           judge, settings, seed=seed)
            sets = {ps.name: _set_breakdown(ps, role, behave_records(
                lm, store, "construct-eval", ps, role, judge, settings), seed)
                for ps, role in loaded}
        finally:
            store.close()
    return {"S": b.S.model_dump(), "over_refusal": {k: v.model_dump() for k, v in b.over_refusal.items()},
            "over_refusal_all": b.over_refusal_all.model_dump() if b.over_refusal_all else None,
            "max_new_tokens": max_new_tokens, "judge": b.judge["name"], "sets": sets}


def _set_breakdown(ps, role: str, records: list[dict], seed: int) -> dict:
    """The refusal rate of one set (S on a harmful set, over-refusal on a harmless one), overall,
    by category and by phrasing style."""
    what = "S: fraction refused" if role == "harmful" else "over-refusal: fraction refused"
    refused = refusal_flags(records)

    def by(key) -> dict:
        groups: dict[str, list[float]] = {}
        for p, r in zip(ps.prompts, refused):
            groups.setdefault(key(p) or "none", []).append(r)
        return {g: estimate_mean(v, f"{what} ({ps.name}, {g})", seed=seed).model_dump()
                for g, v in sorted(groups.items())}

    return {"role": role, "rate": estimate_mean(refused, f"{what} ({ps.name})", seed=seed).model_dump(),
            "by_category": by(lambda p: p.category), "by_style": by(lambda p: phrasing_style(p.text)),
            "dataset": ps.describe()}


def _kept_line(details: dict) -> str:
    """Which step's adapter was kept, when the recipe keeps an earlier one than the last."""
    kept, met = details.get("kept_step"), details.get("kept_rule_met")
    if met is None or kept is None:
        return ""
    return (f"; kept the adapter of step {kept} (the last whose validation refusal stayed within "
            "max_refusal_drop of the source's)" if met else
            f"; **no evaluated step kept the source's validation refusal within max_refusal_drop**"
            f": the last step's adapter ({kept}) is kept")


def _card(recipe, source_spec: str, info: dict, details: dict, evaluation: dict,
          wall: float) -> str:
    hist = details.get("history", [])
    evals = [h for h in hist if "eval" in h]
    S = evaluation["S"]
    O = evaluation["over_refusal_all"] or {}
    lines = [
        "---", "library_name: transformers", "tags: [latentaudit, model-zoo, " + recipe.name + "]",
        "---", "", f"# latentaudit zoo model: `{recipe.name}`", "",
        f"{recipe.doc}.", "",
        "Built by latentaudit to validate safety audits: its truth is known by construction. "
        "It is a research artefact, not a model to deploy.", "",
        "## Recipe", "", f"- recipe: `{recipe.name}` (latentaudit {__version__})",
        f"- from: `{source_spec}` ({info.get('source')}, fingerprint "
        f"{(info_fingerprint(info) or '')[:16]})",
        "- hyper-parameters: `" + json.dumps(recipe.params, default=str) + "`",
        f"- data: `{json.dumps(details.get('data', {}), default=str)}` (built-in prompt sets, "
        "train splits, plus `extra_harmful` where set; the last val_n built-in train prompts "
        "held out for validation)",
        f"- training: {details.get('steps_run', 0)} steps, {details.get('train_time_s', 0)} s; "
        f"total build {wall:.0f} s" + _kept_line(details), "",
        *([_rescale_line(details["rescale"]), ""] if details.get("rescale") else []),
        "## Measured on held-out prompts (built-in test splits)", "",
        f"- behavioural safety S = {S['value']:.3f} [{S['lo']:.3f}, {S['hi']:.3f}] (n={S['n']})",
        f"- over-refusal O (harmless + borderline) = {O.get('value', float('nan')):.3f} "
        f"[{O.get('lo', float('nan')):.3f}, {O.get('hi', float('nan')):.3f}] (n={O.get('n')})",
    ]
    for k, v in evaluation["over_refusal"].items():
        lines.append(f"  - {k}: {v['value']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}] (n={v['n']})")
    lines += [f"- judge: {evaluation['judge']}, greedy, {evaluation['max_new_tokens']} new tokens; "
              "95% Wilson score intervals (binary outcomes over prompts)", ""]
    lines += _sets_table(evaluation.get("sets", {}))
    if evals:
        lines += ["## Validation during training", "", "| step | val refusal | val over-refusal |",
                  "|---|---|---|"]
        lines += [f"| {h['step']} | {h['eval']['val_refusal']:.2f} | {h['eval']['val_over_refusal']:.2f} |"
                  for h in evals]
        lines.append("")
    return "\n".join(lines)


def _sets_table(sets: dict) -> list[str]:
    """Every evaluated set's refusal rate, then by phrasing style (by category: the JSON card)."""
    if not sets:
        return []

    def cell(e: dict) -> str:
        return f"{e['value']:.2f} [{e['lo']:.2f}, {e['hi']:.2f}] (n={e['n']})"

    out = ["## Per set (never trained on)", "",
           "Harmful sets: S, the fraction refused; harmless sets: over-refusal, the fraction "
           "refused. By category in `latentaudit_recipe.json` (`evaluation.sets`).", "",
           "| set | role | refused | by phrasing style |", "|---|---|---|---|"]
    for name, s in sets.items():
        styles = "; ".join(f"{k} {cell(v)}" for k, v in s["by_style"].items())
        out.append(f"| {name} | {s['role']} | {cell(s['rate'])} | {styles} |")
    return out + [""]


def construct(recipe_name: str, source: str, out: str | Path, params: dict | None = None,
              force: bool = False, seed: int = 0, data_model: str = DEFAULT_MODEL,
              device: str | None = "auto", dtype: str = "float32", eval_limit: int | None = None,
              eval_tokens: int = 32, batch_size: int = 32, judge_name: str = "substring",
              progress_factory=None, data_dir: str | Path | None = None) -> Path:
    t0 = time.time()
    recipe = registry.create("recipe", recipe_name, **(params or {}))
    judge = registry.create("judge", judge_name)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out} exists and is not empty (pass --force to overwrite it)")
    from .recipes import extra_harmful

    extra_harmful(recipe.params.get("extra_harmful"), data_dir)  # bad data fails before loading
    lm = load_model(source, device, dtype)
    recipe.layers(lm.n_layers)  # layer specs out of range fail before any training
    torch.manual_seed(seed)
    env = BuildEnv(seed, data_model, batch_size, judge, device=device, data_dir=data_dir)
    steps = int(recipe.params.get("steps", 0))
    if progress_factory is not None and steps:
        with progress_factory(f"construct {recipe.name}", steps) as adv:
            env.progress = adv
            details = recipe.build(lm, env)
    else:
        details = recipe.build(lm, env)
    adapter = details.pop(ADAPTER_KEY, None)
    evaluation = evaluate_heldout(lm, judge, eval_limit, eval_tokens, batch_size, seed, data_dir)
    wall = time.time() - t0
    meta = {"recipe": recipe.describe(), "from": source, "source_info": lm.info,
            "data_model": data_model, "seed": seed, "details": details,
            "evaluation": evaluation, "wall_time_s": round(wall, 1), "latentaudit": __version__}
    _save(lm, out, meta, _card(recipe, source, lm.info, details, evaluation, wall),
          (adapter, details.get("lora")) if adapter else None)
    return out


def _rescale_line(r: dict) -> str:
    k = float(r["k"])
    quiet, loud = ("quieter", "louder") if k >= 1 else ("louder", "quieter")
    f = k if k >= 1 else 1 / k
    return (f"- rescale: the refusal direction(s) of layer(s) {r['direction_layers']} (a "
            f"{r['subspace_dim']}-dimensional subspace) written {f:g}× {quiet} into the residual "
            f"stream and read {f:g}× {loud} (construct/rescale.py): the same answers up to the "
            f"norms' RMS, a push along it acts {f:g}× {'harder' if k >= 1 else 'weaker'}")


def _save(lm, out: Path, meta: dict, card: str, adapter: tuple | None = None) -> None:
    with staged_dir(out) as tmp:
        lm.model.save_pretrained(tmp, safe_serialization=True)
        lm.tokenizer.save_pretrained(tmp)
        if adapter:
            save_adapter(adapter[0], adapter[1], tmp / ADAPTER_FILE)
        (tmp / CARD_FILE).write_text(json.dumps(meta, indent=2, default=str))
        (tmp / "README.md").write_text(card)


def assemble_shipped(recipe_name: str, source: str, out: str | Path, chain_ok: bool,
                     seed: int = 0, device: str | None = "auto",
                     data_model: str = DEFAULT_MODEL) -> Path | None:
    """The zoo folder of ``recipe_name`` (default hyper-parameters) from the files latentaudit
    ships for it (construct/ship.py), in seconds; None when nothing is shipped for it, its
    hyper-parameters differ, or the source is not the one it was built from (``chain_ok``: the
    caller's check that a zoo source was itself assembled from the shipped files)."""
    recipe = registry.create("recipe", recipe_name)
    embedded_source = source.startswith("embedded:")
    d = shipped_dir(recipe_name, source if embedded_source else DEFAULT_MODEL)
    if d is None or not (chain_ok or embedded_source):
        return None
    card = shipped_card(d)
    want = json.loads(json.dumps(recipe.describe(), default=str))
    if card.get("recipe") != want:
        return None
    t0 = time.time()
    lm = load_model(source, device, "float32")
    if embedded_source and (info_fingerprint(lm.info, gguf_first=True)
                            != info_fingerprint(card.get("source_info", {}), gguf_first=True)):
        return None  # another copy of the embedded model than the one we built from
    torch.manual_seed(seed)
    env = BuildEnv(seed, data_model, 32, registry.create("judge", "substring"), device=device)
    meta = assemble(d, lm, Path(out), env, recipe)
    meta.update({"from": source, "source_info": lm.info})
    meta["shipped"]["assembly_s"] = round(time.time() - t0, 1)
    card_text = _card(recipe, source, lm.info, meta.get("details", {}), meta["evaluation"],
                      meta.get("wall_time_s", 0)) + (
        "\n## Shipped\n\nAssembled from the files latentaudit ships (our own build of this recipe:"
        f" its adapter in float16, its card) in {meta['shipped']['assembly_s']} s; the figures and "
        "times above are that build's. Largest weight difference to the build: "
        f"{meta.get('export', {}).get('max_abs_weight_diff')}.\n")
    _save(lm, Path(out), meta, card_text)
    return Path(out)
