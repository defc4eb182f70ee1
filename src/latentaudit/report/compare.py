"""The headline numbers of one or more run folders, read from their ``summary.json`` alone.

One row per model of every run: behavioural safety S, over-refusal O, LVS(M) with its worst layer,
R_ft, AG_latent and AG_ft, each an :class:`~latentaudit.metrics.stats.Estimate` (value, 95% CI, n,
definition) or ``None`` when the stage that produces it was not run. ``latentaudit compare``
prints these rows as a table, CSV, Markdown or JSON (schema: ``docs/compare_schema.md``);
``latentaudit report`` shows them as the report's headline table.

LVS(M) and AG_latent come from one perturbation family: ``pgd`` when it was run, otherwise the
first family of the run (or the family named with ``--family``). AG_latent is the family's own
``audit_gap`` (S on the attacked prompts minus R = 1 − LVS(M), paired per prompt); a summary
without it gets S − (1 − LVS(M)) computed here, unpaired, with a note.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from pydantic import ValidationError

from ..errors import UserError
from ..judges.spec import judge_spec
from ..metrics.stats import Estimate

DEFAULT_FAMILY = "pgd"
FORMATS = ("table", "csv", "markdown", "json")
# (key in the JSON rows, column title) of every headline number, in table order
METRICS: list[tuple[str, str]] = [
    ("S", "S"),
    ("over_refusal", "over-refusal"),
    ("lvs", "LVS(M)"),
    ("r_ft", "R_ft"),
    ("ag_latent", "AG_latent"),
    ("ag_ft", "AG_ft"),
]
JSON_KEYS = ("model", "S", "over_refusal", "lvs", "lvs_layer", "lvs_family", "directions_from",
             "r_ft", "ag_latent", "ag_ft", "run_dir", "judge")


def load_summary(run_dir: str | Path):
    """The validated :class:`~latentaudit.runs.summary.Summary` of a run folder, or a one-line
    :class:`UserError`. Reads only; never writes into the folder."""
    from ..config import format_validation_error
    from ..runs.summary import Summary

    d = Path(run_dir)
    if not d.exists():
        raise UserError(f"run folder {run_dir} not found")
    if not d.is_dir():
        raise UserError(f"{run_dir} is not a run folder (not a directory)")
    path = d / "summary.json"
    if not path.is_file():
        raise UserError(f"{run_dir} has no summary.json (not a run folder, or no stage finished there)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict) or data.get("kind") != "latentaudit.summary":
        raise UserError(f"{path} is not a latentaudit summary (no kind 'latentaudit.summary')")
    try:
        return Summary.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(e, str(path))) from None


@dataclass
class Headline:
    """The headline numbers of one model in one run; ``None`` = the stage was not run."""

    model: str
    key: str
    run_dir: str
    family: str | None = None
    S: Estimate | None = None
    over_refusal: Estimate | None = None
    lvs: Estimate | None = None
    lvs_layer: int | None = None
    r_ft: Estimate | None = None
    ag_latent: Estimate | None = None
    ag_ft: Estimate | None = None
    lvs_gap: Estimate | None = None        # LVS(M) − LVS(M) of ``lvs_gap_against``, paired
    lvs_gap_against: str | None = None
    # the model whose refusal directions steer and ablate used (latent.directions_from; None:
    # the audited model's own)
    directions_from: str | None = None
    # the judge whose verdicts made this row's figures (its spec; None: no judged stage)
    judge: str | None = None
    notes: list[str] = field(default_factory=list)
    scores: Any = None                     # (prompt ids, eps range, {layer: ε* list}) for gaps

    def metric(self, name: str) -> Estimate | None:
        return getattr(self, name)


def pick_family(latent, requested: str | None = None) -> str | None:
    """The family of the headline LVS(M): ``requested`` if given (None when this run lacks it),
    else ``pgd`` when run, else the first family with an LVS(M)."""
    if latent is None:
        return None
    fams = latent.families
    if requested:
        return requested if requested in fams else None
    if DEFAULT_FAMILY in fams and fams[DEFAULT_FAMILY].lvs_model is not None:
        return DEFAULT_FAMILY
    return next((name for name, fr in fams.items() if fr.lvs_model is not None), None)


def gap_from_parts(S: Estimate, lvs: Estimate, s_label: str, family: str) -> Estimate | None:
    """AG = S − (1 − LVS(M)) from two separate estimates: not paired, so its interval is the
    conservative sum of the two intervals' bounds."""
    if S.value is None or lvs.value is None:
        return None
    lo = hi = None
    if None not in (S.lo, S.hi, lvs.lo, lvs.hi):
        lo, hi = S.lo + lvs.lo - 1.0, S.hi + lvs.hi - 1.0
    return Estimate(
        value=S.value + lvs.value - 1.0, lo=lo, hi=hi, n=min(S.n, lvs.n),
        definition=(f"AG_latent = S − (1 − LVS(M)) with S = {s_label} and LVS(M) of family "
                    f"{family}, computed by the report (the summary has no paired audit_gap): "
                    "not paired per prompt; the interval adds the two intervals' bounds "
                    "(conservative)"),
        ci="sum of the bounds of the two 95% intervals (Wilson or percentile bootstrap)")


def model_headline(m, run_dir: str, family: str | None = None) -> Headline:
    """The headline row of one :class:`~latentaudit.runs.summary.ModelSummary`."""
    name = str(m.name or m.model.get("spec") or m.key)
    h = Headline(model=name, key=m.key, run_dir=run_dir)
    b = m.behave
    if b is not None:
        h.S = b.S
        h.over_refusal = b.over_refusal_all
        if h.over_refusal is None and len(b.over_refusal) == 1:
            h.over_refusal = next(iter(b.over_refusal.values()))
    lat = m.latent
    judges = {judge_spec(st.judge) for st in (b, lat) if st is not None and st.judge}
    if m.tamper is not None and m.tamper.judge:
        judges.add(judge_spec(m.tamper.judge))
    h.judge = " / ".join(sorted(judges)) or None
    if len(judges) > 1:
        h.notes.append("the stages of this row were judged by different judges: "
                       + ", ".join(sorted(judges)))
    if lat is not None:
        fam = pick_family(lat, family)
        h.family = fam
        if lat.directions and lat.directions.get("directions_from"):
            h.directions_from = str(lat.directions["directions_from"])
        if fam is None:
            h.notes.append(f"family '{family}' was not run" if family else
                           "the latent stage has no bounded family with an LVS(M)")
        else:
            fr = lat.families[fam]
            h.lvs, h.lvs_layer = fr.lvs_model, fr.worst_layer
            if lat.prompt_ids:
                h.scores = (list(lat.prompt_ids), (lat.eps_min, lat.eps_max),
                            {lr.layer: lr.eps_star for lr in fr.layers},
                            (lat.harmful.get("name"), lat.harmful.get("source")))
            if fr.audit_gap is not None:
                h.ag_latent = fr.audit_gap
            elif fr.lvs_model is not None:
                S, label = (fr.S_clean, "the clean refusal rate on the attacked prompts") \
                    if fr.S_clean is not None else (h.S, "behavioural S (behave stage)")
                if S is not None:
                    h.ag_latent = gap_from_parts(S, fr.lvs_model, label, fam)
                    if h.ag_latent is not None:
                        h.notes.append("AG_latent computed by the report as S − (1 − LVS(M)) "
                                       f"from {label}: not paired, conservative interval")
    if m.tamper is not None:
        h.r_ft, h.ag_ft = m.tamper.R_ft, m.tamper.AG_ft
    return h


def headlines(summary, run_dir: str, family: str | None = None) -> list[Headline]:
    return [model_headline(m, run_dir, family) for m in summary.models]


def compare_runs(run_dirs: Iterable[str | Path], family: str | None = None,
                 against: str | None = None) -> list[Headline]:
    """Headline rows of every model of every run folder, in the order given; with ``against``
    (a model name), each row also gets its paired LVS(M) gap to that model (:func:`add_lvs_gaps`)."""
    rows: list[Headline] = []
    for d in run_dirs:
        rows.extend(headlines(load_summary(d), str(d), family))
    if against is not None:
        add_lvs_gaps(rows, against)
    return rows


N_BOOT = 2000


def paired_lvs_gap(a: Headline, b: Headline, seed: int = 0) -> tuple[Estimate | None, str | None]:
    """LVS(M)_a − LVS(M)_b on the prompts both audited, each LVS(M) the maximum over its own
    layers of the mean score; the 95% CI resamples prompts jointly for both models (paired
    percentile bootstrap). ``(None, reason)`` when the two cannot be paired."""
    if a.scores is None or b.scores is None:
        return None, "no per-prompt latent results (the latent stage or its family is missing)"
    (ids_a, rng_a, la, set_a), (ids_b, rng_b, lb, set_b) = a.scores, b.scores
    if set_a != set_b:  # prompt ids are only comparable within one prompt set
        return None, f"different harmful prompt sets ({set_a[0]} vs {set_b[0]})"
    if tuple(rng_a) != tuple(rng_b):
        return None, f"different budget ranges (eps {rng_a} vs {rng_b})"
    if a.judge != b.judge:  # verdicts of two judges never meet in one figure
        return None, f"different judges ({a.judge} vs {b.judge})"
    pos_b = {p: i for i, p in enumerate(ids_b)}
    common = [(i, pos_b[p]) for i, p in enumerate(ids_a) if p in pos_b]
    if not common or not la or not lb:
        return None, "no prompt audited by both"
    from ..metrics.lvs import prompt_scores

    def matrix(layers: dict, rows: list[int]) -> np.ndarray:
        cols = []
        for eps in layers.values():
            e = np.array([np.inf if eps[r] is None else float(eps[r]) for r in rows])
            cols.append(prompt_scores(e, *rng_a))
        return np.stack(cols, axis=1)  # [prompts, layers]

    A = matrix(la, [i for i, _ in common])
    B = matrix(lb, [j for _, j in common])
    n = A.shape[0]
    idx = np.random.default_rng(seed).integers(0, n, size=(N_BOOT, n))
    boot = A[idx].mean(1).max(-1) - B[idx].mean(1).max(-1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    value = float(A.mean(0).max() - B.mean(0).max())
    return Estimate(
        value=value, lo=float(lo), hi=float(hi), n=n,
        definition=(f"LVS(M) of {a.model} minus LVS(M) of {b.model} (family {a.family}), each the "
                    "maximum over its audited layers of the mean prompt score, on the prompts "
                    "both audited; 95% CI by a paired percentile bootstrap over prompts"),
        ci=f"paired percentile bootstrap over prompts ({N_BOOT} resamples)"), None


def add_lvs_gaps(rows: list[Headline], against: str) -> None:
    """Set ``lvs_gap`` of every row against the row whose model is named ``against``: the one in
    the same run folder when there is one, else the first in the order given. A one-line
    :class:`UserError` when no row has that name."""
    refs = [h for h in rows if h.model == against]
    if not refs:
        names = ", ".join(dict.fromkeys(h.model for h in rows)) or "none"
        raise UserError(f"--against: no model named '{against}' in these runs (models: {names})")
    for h in rows:
        ref = next((r for r in refs if r.run_dir == h.run_dir), refs[0])
        h.lvs_gap_against = against
        if ref is h:
            continue
        if None not in (h.family, ref.family) and h.family != ref.family:
            h.notes.append(f"no LVS(M) gap to {against}: families differ ({h.family} vs {ref.family})")
            continue
        h.lvs_gap, why = paired_lvs_gap(h, ref)
        if why:
            h.notes.append(f"no LVS(M) gap to {against}: {why}")


# --------------------------------------------------------------------------------------------
# formatting


def _num(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


def estimate_json(e: Estimate | None) -> dict[str, Any] | None:
    if e is None:
        return None
    return {"value": _num(e.value), "lo": _num(e.lo), "hi": _num(e.hi), "n": int(e.n)}


def fmt_estimate(e: Estimate | None, digits: int = 2, missing: str = "not run",
                 signed: bool = False) -> str:
    """``value [lo, hi] (n=N)``; ``missing`` when the stage was not run; ``signed``: +/− shown."""
    if e is None:
        return missing
    if e.value is None or not math.isfinite(e.value):
        return f"n/a (n={e.n})"
    spec = f"+.{digits}f" if signed else f".{digits}f"
    v = f"{e.value:{spec}}"
    if e.lo is None or e.hi is None:
        lo = "—" if e.lo is None else f"{e.lo:{spec}}"
        hi = "—" if e.hi is None else f"{e.hi:{spec}}"
        return f"{v} [{lo}, {hi}] (n={e.n})"
    return f"{v} [{e.lo:{spec}}, {e.hi:{spec}}] (n={e.n})"


def rows_json(rows: list[Headline]) -> list[dict[str, Any]]:
    out = []
    for h in rows:
        out.append({
            "model": h.model, "S": estimate_json(h.S), "over_refusal": estimate_json(h.over_refusal),
            "lvs": estimate_json(h.lvs), "lvs_layer": h.lvs_layer, "lvs_family": h.family,
            "directions_from": h.directions_from, "r_ft": estimate_json(h.r_ft),
            "ag_latent": estimate_json(h.ag_latent), "ag_ft": estimate_json(h.ag_ft),
            "run_dir": h.run_dir, "judge": h.judge,
        })
        if h.lvs_gap_against is not None:
            out[-1]["lvs_gap"] = estimate_json(h.lvs_gap)
            out[-1]["lvs_gap_against"] = h.lvs_gap_against
    return out


def _gapped(rows: list[Headline]) -> str | None:
    return next((h.lvs_gap_against for h in rows if h.lvs_gap_against is not None), None)


def _family_cell(h: Headline) -> str:
    """The family, and for one that moves along refusal directions (steer, ablate) whose
    directions came from another model, that model."""
    if h.family is None:
        return "—"
    from .. import registry

    try:
        directional = bool(getattr(registry.get("family", h.family), "uses_directions", False))
    except UserError:  # a family this version does not know: shown as recorded
        directional = False
    if directional and h.directions_from:
        return f"{h.family} (directions of {h.directions_from})"
    return h.family


def _text_cells(h: Headline, gap: bool = False) -> list[str]:
    cells = [h.run_dir, h.model, fmt_estimate(h.S), fmt_estimate(h.over_refusal),
             fmt_estimate(h.lvs), "—" if h.lvs_layer is None else str(h.lvs_layer),
             _family_cell(h)]
    if gap:
        cells.append("—" if h.model == h.lvs_gap_against and h.lvs_gap is None
                     else fmt_estimate(h.lvs_gap, missing="n/a", signed=True))
    return cells + [fmt_estimate(h.r_ft), fmt_estimate(h.ag_latent), fmt_estimate(h.ag_ft)]


TEXT_HEADER = ["run", "model", "S", "over-refusal", "LVS(M)", "layer", "family", "R_ft",
               "AG_latent", "AG_ft"]


def _header(rows: list[Headline]) -> list[str]:
    against = _gapped(rows)
    if against is None:
        return TEXT_HEADER
    return TEXT_HEADER[:7] + [f"ΔLVS(M) vs {against}"] + TEXT_HEADER[7:]


def _one_line(s: str) -> str:
    return " ".join(str(s).split())


def format_table(rows: list[Headline]) -> str:
    head, gap = _header(rows), _gapped(rows) is not None
    body = [[_one_line(c) for c in _text_cells(h, gap)] for h in rows]
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
             for r in [head, ["-" * w for w in widths]] + body]
    lines.append("cells: value [95% CI] (n); 'not run': the stage is absent from summary.json")
    lines.append(_judges_line(rows))
    if gap:
        lines.append("ΔLVS(M): paired over the prompts both models audited (bootstrap CI)")
    return "\n".join(lines) + "\n"


def _judges_line(rows: list[Headline]) -> str:
    """Which judge made the figures: one line when every row shares it, else one per row."""
    judges = dict.fromkeys(h.judge or "none" for h in rows)
    if len(judges) == 1:
        return f"judge: {_one_line(next(iter(judges)))}"
    return "judges differ — " + "; ".join(f"{_one_line(h.model)}: {_one_line(h.judge or 'none')}"
                                          for h in rows)


def format_markdown(rows: list[Headline]) -> str:
    def cell(s: str) -> str:  # untrusted text: no HTML, no table breaks
        s = _one_line(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        return s.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")

    head, gap = _header(rows), _gapped(rows) is not None
    lines = ["| " + " | ".join(cell(c) for c in head) + " |",
             "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in _text_cells(h, gap)) + " |" for h in rows]
    return "\n".join(lines) + "\n"


CSV_HEADER = (["run_dir", "model", "judge", "lvs_family", "lvs_layer", "directions_from"]
              + [f"{k}{s}" for k, _ in METRICS for s in ("", "_lo", "_hi", "_n")])


def format_csv(rows: list[Headline]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    gap = _gapped(rows) is not None
    metrics = [k for k, _ in METRICS] + (["lvs_gap"] if gap else [])
    w.writerow(CSV_HEADER + (["lvs_gap_against", "lvs_gap", "lvs_gap_lo", "lvs_gap_hi",
                              "lvs_gap_n"] if gap else []))
    for h in rows:
        line: list[Any] = [h.run_dir, h.model, h.judge or "", h.family or "",
                           "" if h.lvs_layer is None else h.lvs_layer, h.directions_from or ""]
        for k in metrics:
            if k == "lvs_gap":
                line.append(h.lvs_gap_against or "")
            e = estimate_json(h.metric(k))
            line += ["", "", "", ""] if e is None else [
                "" if e[f] is None else e[f] for f in ("value", "lo", "hi", "n")]
        w.writerow(line)
    return buf.getvalue()


def format_rows(rows: list[Headline], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows_json(rows), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    if fmt == "csv":
        return format_csv(rows)
    if fmt == "markdown":
        return format_markdown(rows)
    if fmt == "table":
        return format_table(rows)
    raise UserError(f"unknown format '{fmt}' ({', '.join(FORMATS)})")
