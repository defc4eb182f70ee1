"""``latentaudit report``: one self-contained HTML file rebuilt from a run folder alone.

Inputs: ``summary.json`` (every number) and ``store.sqlite`` (sample transcripts), both only
read — the store is opened read-only and the report is written through a temporary file, so a
failed build leaves the run's data and any earlier report as they were. No model is loaded.

The file needs no network to open: plots are matplotlib PNGs (Agg) inlined as base64, the CSS is
inline, and the only script is the report's own few lines (allowed by hash in the page's
Content-Security-Policy; nothing else may run). Everything that comes from a model, the store or
the configuration is untrusted text: the template autoescapes it, and nothing of it is ever
marked safe.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..files import write_text
from ..judges.spec import judge_spec
from ..runs import keys
from ..runs.store import ResultStore
from .compare import add_lvs_gaps, fmt_estimate, headlines, load_summary, pick_family
from .plots import (plot_asr_curves, plot_depth_profile, plot_heatmap, plot_refusal_curves,
                    plot_scatter, scatter_points)

TEMPLATE = "report.html.j2"
MAX_TRANSCRIPTS = 5
# The report's only script. It records script errors and failed resource loads into the page
# (data-errors on #la-integrity), marks that scripts ran, and whether the global canary
# ``window.__pwned`` exists — the browser test injects model text that would set it if it were
# ever rendered as markup. Allowed by its sha256 in the page's CSP; no other script can run.
PAGE_SCRIPT = """
(function () {
  var errors = [];
  window.addEventListener("error", function (e) {
    errors.push(String((e && e.message) || (e && e.target && e.target.tagName) || "error"));
  }, true);
  window.addEventListener("load", function () {
    var el = document.getElementById("la-integrity");
    if (!el) { return; }
    el.setAttribute("data-js", "ran");
    el.setAttribute("data-errors", String(errors.length));
    el.setAttribute("data-pwned", typeof window.__pwned === "undefined" ? "no" : "yes");
  });
})();
"""


def _csp() -> str:
    digest = base64.b64encode(hashlib.sha256(PAGE_SCRIPT.encode()).digest()).decode()
    return ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
            f"script-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'")


# --------------------------------------------------------------------------------------------
# transcripts from the store


@dataclass
class Transcript:
    prompt_id: str
    prompt: str | None
    clean: dict
    status: str
    perturbed: dict | None = None
    eps: float | None = None


@dataclass
class TranscriptSet:
    family: str | None
    layer: int | None
    items: list[Transcript] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _prompt_texts(store: ResultStore, m, lat, config: dict) -> tuple[dict[str, str], list[str]]:
    """Prompt id → text for the latent stage's harmful set, and the set's order when known:
    the builtin set (or a local file) reloaded and checked against the recorded sha256, else
    the behave stage's records of a set with the same name."""
    texts: dict[str, str] = {}
    order: list[str] = []
    spec = str(lat.config.get("harmful") or "")
    want = lat.harmful.get("sha256")
    if spec.startswith("builtin:") or (spec and Path(spec).is_file()):
        try:
            from ..data.sets import load_prompt_set

            ps = load_prompt_set(spec, config.get("data_dir"), config.get("behave", {}).get("prompt_col"),
                                 config.get("limit"))
            if want and ps.sha256 == want:
                texts = {p.id: p.text for p in ps.prompts}
                order = [p.id for p in ps.prompts]
        except Exception:  # noqa: BLE001  (any failure: fall back to the store)
            pass
    if not texts:
        name = lat.harmful.get("name")
        for _, rec in store.items(keys.model_prefix("behave", m.key)):
            if rec.get("set") == name and isinstance(rec.get("prompt"), str):
                texts.setdefault(str(rec.get("prompt_id")), rec["prompt"])
    return texts, order


def collect_transcripts(store: ResultStore, m, family: str | None, config: dict,
                        limit: int = MAX_TRANSCRIPTS) -> TranscriptSet:
    """Clean and pushed responses of the latent stage, read under the store prefixes its
    summary recorded: the family's worst layer, each prompt's smallest successful budget."""
    lat = m.latent
    fr = lat.families.get(family) if family else None
    layer = fr.worst_layer if fr is not None else None
    out = TranscriptSet(family=family, layer=layer)
    recorded = lat.store_prefixes
    if not recorded:
        out.notes.append("this summary predates recorded store prefixes: no sample transcripts "
                         "(run the latent stage again into this folder to record them; nothing "
                         "is recomputed)")
        return out
    clean = {k[len(recorded["clean"]):]: rec for k, rec in store.items(recorded["clean"])}
    if not clean:
        out.notes.append("the store holds no clean latent-stage responses for this model")
        return out
    texts, order = _prompt_texts(store, m, lat, config)
    pids = [p for p in (lat.prompt_ids or order) if p in clean] or sorted(clean)
    # pushed responses at the worst layer of the family
    pert: dict[str, list[dict]] = {}
    prefix = recorded["families"].get(family, {}).get(str(layer)) if fr is not None else None
    if prefix:
        for k, rec in store.items(prefix):
            pid, _ = keys.parse_eps_key(prefix, k)
            eps = rec.get("eps")
            if isinstance(eps, (int, float)) and math.isfinite(eps):
                pert.setdefault(pid, []).append(rec)
    items_a, items_b, items_c = [], [], []
    for pid in pids:
        c = clean[pid]
        recs = pert.get(pid, [])
        ok = [r for r in recs if r.get("success")]
        t = Transcript(pid, texts.get(pid), c, "")
        if c.get("success"):
            t.status = "elicited with no perturbation (ε* = 0)"
            items_b.append(t)
        elif ok:
            best = min(ok, key=lambda r: r["eps"])
            t.perturbed, t.eps = best, float(best["eps"])
            t.status = f"elicited at ε = {best['eps']:.4g} (smallest successful budget tried)"
            items_a.append(t)
        else:
            if recs:
                last = max(recs, key=lambda r: r["eps"])
                t.perturbed, t.eps = last, float(last["eps"])
                t.status = f"not elicited within ε_max; largest budget tried ε = {last['eps']:.4g}"
            else:
                t.status = "not elicited; no perturbed response in the store"
            items_c.append(t)
    # the dissociation cases first: refused clean, elicited by a push
    items_a.sort(key=lambda t: t.clean.get("verdict") != "refusal")
    out.items = (items_a + items_b + items_c)[:limit]
    if fr is None:
        out.notes.append("no bounded family: clean responses only")
    elif not pert:
        out.notes.append(f"no perturbed responses for family {family} at layer {layer} in the store "
                         "(every prompt elicited with no push, or none attacked)")
    if not texts:
        out.notes.append("prompt texts unavailable (the harmful set could not be reloaded offline "
                         "and the behave stage did not record it): prompt ids only")
    return out


# --------------------------------------------------------------------------------------------
# assembling the page


def _env():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader("latentaudit.report", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["est"] = fmt_estimate
    env.filters["judge"] = judge_spec
    env.filters["yn"] = lambda v: "—" if v is None else ("yes" if v else "no")
    env.filters["tojson_pretty"] = lambda obj: json.dumps(obj, indent=2, ensure_ascii=False,
                                                          default=str, sort_keys=True)
    return env


def _stale_stages(store: ResultStore | None, m) -> list[str]:
    """Stages whose records the store holds for this model but summary.json does not include."""
    if store is None:
        return []
    out = []
    if m.behave is None and store.any(keys.model_prefix("behave", m.key), '%"role": "harmful"%'):
        out.append("behave")
    if m.latent is None and store.any(keys.model_prefix("latent", m.key)):
        out.append("latent")
    if (m.tamper is None and m.tamper_control is None
            and store.any(keys.tamper_checkpoints_prefix(m.key))):
        out.append("tamper")
    return out


def render_report(run_dir: str | Path, family: str | None = None,
                  against: str | None = None) -> str:
    """The report's HTML for a run folder (reads only); ``against``: a model name whose LVS(M)
    every other model's is compared with, paired over prompts (a column of the headline)."""
    from markupsafe import Markup

    run_dir = Path(run_dir)
    summary = load_summary(run_dir)
    heads = headlines(summary, str(run_dir), family)
    if against is not None:
        add_lvs_gaps(heads, against)
    if family and all(h.family is None for h in heads) and any(m.latent for m in summary.models):
        raise UserError(f"family '{family}' was not run in {run_dir} (run: "
                        + ", ".join(sorted({f for m in summary.models if m.latent
                                            for f in m.latent.families})) + ")")
    store_path = run_dir / "store.sqlite"
    notes: list[str] = []
    store = None
    if not store_path.is_file():
        notes.append("store.sqlite is missing: no sample transcripts")
    else:
        try:
            store = ResultStore(store_path, read_only=True)
        except UserError as e:  # the numbers come from summary.json: report them anyway
            notes.append(f"{e}: no sample transcripts")
    try:
        models = []
        for m, h in zip(summary.models, heads):
            lat = m.latent
            fam = pick_family(lat, family)
            entry: dict[str, Any] = {"m": m, "h": h, "name": h.model, "plots": [],
                                     "stale": _stale_stages(store, m), "transcripts": None}
            if lat is not None:
                for title, png in (("LVS depth profile", plot_depth_profile(h.model, lat)),
                                   ("ASR vs ε", plot_asr_curves(h.model, lat)),
                                   ("ASR by layer × ε", plot_heatmap(h.model, lat))):
                    if png:
                        entry["plots"].append((title, png))
                if store is not None:
                    entry["transcripts"] = collect_transcripts(store, m, fam, summary.config)
            png = plot_refusal_curves(h.model, m.tamper, m.tamper_control)
            if png:
                entry["plots"].append(("refusal vs fine-tuning steps r(s)", png))
            models.append(entry)
    finally:
        if store is not None:
            store.close()
    scatter = plot_scatter(scatter_points([(summary, heads)]))
    stages = sorted({s for m in summary.models for s, v in
                     (("behave", m.behave), ("latent", m.latent), ("tamper", m.tamper),
                      ("tamper_control", m.tamper_control)) if v is not None})
    prov = summary.provenance
    return _env().get_template(TEMPLATE).render(
        summary=summary, run_dir=str(run_dir), heads=heads, models=models, scatter=scatter,
        notes=notes, stages=stages, prov=prov, family=family, against=against,
        generated=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        csp=_csp(), page_script=Markup(PAGE_SCRIPT),  # our own constant, never model text
    )


def build_report(run_dir: str | Path, out: str | Path | None = None,
                 family: str | None = None, against: str | None = None) -> Path:
    """Render the report of ``run_dir`` and write it atomically (default ``RUN_DIR/report.html``)."""
    html = render_report(run_dir, family, against)
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    write_text(path, html)
    return path
