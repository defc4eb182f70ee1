"""How far judges agree: one judge against human labels, and judges against each other.

Every metric of two binary raters is a function of their 2x2 table of counts, so a bootstrap
resample of rows is one multinomial draw of that table (n rows, cell probabilities = the
observed shares): it is the same distribution as resampling rows with replacement, without an
n-by-resamples index matrix, and every metric of a resample comes from the same draw.

A label column is mapped to refusal/compliance by a label map: ``xstest`` (XSTest's
``final_label``), the identity (values already ``refusal``/``compliance``) or a user map
``VALUE=refusal,VALUE2=compliance``. Values such as 0/1, true/false, yes/no say nothing about
which side is "refusal", so they need an explicit map.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import UserError
from ..metrics.stats import Estimate

N_RESAMPLES = 2000
SEED = 0
CI = f"95% percentile bootstrap over rows ({N_RESAMPLES} resamples, seed {SEED}; resamples where the metric is undefined are left out)"

LABELS = ("refusal", "compliance")
IDENTITY = {"refusal": "refusal", "compliance": "compliance"}
# XSTest v2 final_label; a partial refusal counts as refusal (as in benchmarks/bench_judge.py)
XSTEST = {"1_full_compliance": "compliance", "2_full_refusal": "refusal",
          "3_partial_refusal": "refusal"}
NAMED_MAPS = {"xstest": XSTEST, "identity": IDENTITY}
# binary codings whose polarity is a convention of the file, not ours to guess
AMBIGUOUS = frozenset({"0", "1", "true", "false", "yes", "no", "y", "n", "t", "f"})

DEFINITIONS = {
    "accuracy": "share of rows where the judge's verdict equals the human label",
    "false_refusal_rate": "share of rows labelled compliance that the judge calls refusal",
    "missed_refusal_rate": "share of rows labelled refusal that the judge calls compliance",
    "kappa": "Cohen's kappa between the judge's verdicts and the human labels "
             "(agreement beyond chance: 1 perfect, 0 chance level)",
}
PAIR_DEFINITIONS = {
    "agreement": "share of rows where the two judges give the same verdict",
    "kappa": "Cohen's kappa between the two judges' verdicts "
             "(agreement beyond chance: 1 perfect, 0 chance level)",
}


# ----------------------------------------------------------------------------- label maps

def norm_value(value: Any) -> str:
    """A label value as the key a label map is looked up with: text, stripped, lower-case
    (JSON ``true`` -> ``"true"``, ``1.0`` -> ``"1"``, ``null`` -> ``""``)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip().lower()


def _short(value: Any, limit: int = 40) -> str:
    """A label value quoted for a one-line error: repr (no control characters), truncated."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def parse_label_map(spec: str | Mapping[str, str]) -> dict[str, str]:
    """``"A=refusal,B=compliance"`` (or a dict) -> ``{"a": "refusal", "b": "compliance"}``,
    keys normalised as :func:`norm_value` does. Raises UserError on a malformed map."""
    if isinstance(spec, Mapping):
        items = [(str(k), str(v)) for k, v in spec.items()]
    else:
        items = []
        for part in str(spec).split(","):
            if not part.strip():
                continue
            key, sep, target = part.rpartition("=")
            if not sep or not key.strip():
                raise UserError(f"--label-map item {part.strip()!r} is not VALUE=refusal or "
                                "VALUE=compliance")
            items.append((key, target))
    mapping: dict[str, str] = {}
    for key, target in items:
        k, t = norm_value(key), target.strip().lower()
        if t not in LABELS:
            raise UserError(f"--label-map: {key.strip()!r} maps to {target.strip()!r}; "
                            "a value maps to refusal or compliance")
        if mapping.get(k, t) != t:
            raise UserError(f"--label-map maps {key.strip()!r} to both refusal and compliance")
        mapping[k] = t
    if not mapping:
        raise UserError("--label-map is empty (use xstest, or VALUE=refusal,VALUE2=compliance)")
    return mapping


def resolve_label_map(spec: str | Mapping[str, str] | None, values: Sequence[Any]) -> tuple[str, dict[str, str]]:
    """The label map to use: returns (name, mapping). ``spec`` is ``None``/``"auto"`` (xstest
    when a value is one of XSTest's, else the identity), ``"xstest"``, ``"identity"``, a
    ``VALUE=LABEL,...`` string or a dict (name ``"custom"``). Auto refuses 0/1, true/false and
    yes/no with a UserError: their polarity must be given."""
    if isinstance(spec, Mapping) or (isinstance(spec, str) and "=" in spec):
        return "custom", parse_label_map(spec)
    name = (spec or "auto").strip().lower()
    if name in NAMED_MAPS:
        return name, dict(NAMED_MAPS[name])
    if name != "auto":
        raise UserError(f"unknown label map {spec!r} (use auto, xstest, identity or "
                        "VALUE=refusal,VALUE2=compliance)")
    seen = {norm_value(v) for v in values}
    if seen & set(XSTEST):
        return "xstest", dict(XSTEST)
    amb = sorted(seen & AMBIGUOUS)
    if amb:
        shown = ", ".join(repr(v) for v in amb[:4])
        raise UserError(f"labels such as {shown} do not say which side is a refusal: "
                        "give --label-map VALUE=refusal,VALUE2=compliance")
    return "identity", dict(IDENTITY)


def apply_label_map(values: Sequence[Any], mapping: Mapping[str, str], where: Sequence[str],
                    name: str = "custom") -> np.ndarray:
    """Map label values: returns a bool array, True where the label is refusal. ``where[i]``
    names row i in errors (``"data.csv line 4"``). A value not in ``mapping`` raises UserError
    naming the row, the value and the known values."""
    out = np.zeros(len(values), dtype=bool)
    for i, v in enumerate(values):
        label = mapping.get(norm_value(v))
        if label is None:
            known = ", ".join(sorted(mapping))
            raise UserError(f"{where[i]}: label {_short(v)} is not in the label map '{name}' "
                            f"(known: {known}); give --label-map VALUE=refusal,...")
        out[i] = label == "refusal"
    return out


# ----------------------------------------------------------------------------- metrics

def _as_refusal(x: Sequence[Any]) -> np.ndarray:
    """Verdicts or labels ("refusal"/"compliance" or bools: True = refusal) as a bool array."""
    a = np.asarray(x)
    if a.dtype == bool:
        return a
    bad = sorted({str(v) for v in a.tolist()} - set(LABELS))
    if bad:
        raise ValueError(f"expected 'refusal' or 'compliance', got {bad[:3]}")
    return a == "refusal"


def table(a: Sequence[Any], b: Sequence[Any]) -> np.ndarray:
    """The 2x2 counts of two raters as ``[both refusal, a refusal & b compliance,
    a compliance & b refusal, both compliance]`` (int array of 4)."""
    x, y = _as_refusal(a), _as_refusal(b)
    if x.shape != y.shape:
        raise ValueError(f"raters of different lengths: {x.shape[0]} and {y.shape[0]}")
    return np.array([(x & y).sum(), (x & ~y).sum(), (~x & y).sum(), (~x & ~y).sum()], dtype=np.int64)


def kappa_from_counts(c: np.ndarray) -> np.ndarray:
    """Cohen's kappa of 2x2 count tables (last axis: the 4 cells of :func:`table`); NaN where
    chance agreement is 1 (both raters give one and the same label on every row)."""
    c = np.asarray(c, dtype=float)
    n = c.sum(-1)
    rr, rc, cr, cc = np.moveaxis(c, -1, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        po = (rr + cc) / n
        pe = ((rr + rc) * (rr + cr) + (cr + cc) * (rc + cc)) / n**2
        k = (po - pe) / (1 - pe)
    return np.where(np.isclose(pe, 1.0) | (n == 0), np.nan, k)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


# metric name -> (statistic of counts, n of the metric's denominator) for judge vs labels,
# with a = judge, b = labels
def _label_stats(c: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    c = np.asarray(c, dtype=float)
    rr, rc, cr, cc = np.moveaxis(c, -1, 0)
    n = c.sum(-1)
    return {
        "accuracy": (_ratio(rr + cc, n), n),
        "false_refusal_rate": (_ratio(rc, rc + cc), rc + cc),
        "missed_refusal_rate": (_ratio(cr, rr + cr), rr + cr),
        "kappa": (kappa_from_counts(c), n),
    }


def _pair_stats(c: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    c = np.asarray(c, dtype=float)
    rr, rc, cr, cc = np.moveaxis(c, -1, 0)
    n = c.sum(-1)
    return {"agreement": (_ratio(rr + cc, n), n), "kappa": (kappa_from_counts(c), n)}


def _reason(metric: str, counts: np.ndarray, names: tuple[str, str]) -> str:
    """Why a metric is undefined on these counts (one line)."""
    rr, rc, cr, cc = (int(x) for x in counts)
    n = rr + rc + cr + cc
    if n == 0:
        return "no rows"
    if metric == "false_refusal_rate":
        return "no rows labelled compliance"
    if metric == "missed_refusal_rate":
        return "no rows labelled refusal"
    label = "refusal" if rr == n else "compliance"
    return (f"{names[0]} and {names[1]} say {label} on every row: chance agreement is 1, "
            "so kappa is 0/0")


@dataclass
class Agreement:
    """Agreement of two raters on n rows: ``counts`` (see :func:`table`), an :class:`Estimate`
    per metric (value None where undefined) and, for each undefined one, a reason."""

    n: int
    counts: list[int]
    estimates: dict[str, Estimate]
    reasons: dict[str, str] = field(default_factory=dict)

    def metric(self, name: str) -> dict:
        """One metric as JSON: the Estimate's fields, plus ``reason`` when it is undefined."""
        d = self.estimates[name].model_dump()
        if name in self.reasons:
            d["reason"] = self.reasons[name]
        return d


def _agreement(counts: np.ndarray, stats, definitions: Mapping[str, str], names: tuple[str, str],
               n_resamples: int, seed: int) -> Agreement:
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    point = stats(counts)
    boot: dict = {}
    if n > 0:
        draws = np.random.default_rng(seed).multinomial(n, counts / n, size=n_resamples)
        boot = stats(draws)
    estimates, reasons = {}, {}
    for name, (value, denom) in point.items():
        value, m = float(value), int(denom)
        lo = hi = None
        if np.isfinite(value):
            finite = boot[name][0][np.isfinite(boot[name][0])]
            if finite.size:
                lo, hi = (float(q) for q in np.percentile(finite, [2.5, 97.5]))
            else:  # every resample undefined: no interval to give beyond the point
                lo = hi = value
        else:
            value = None
            reasons[name] = _reason(name, counts, names)
        estimates[name] = Estimate(value=value, lo=lo, hi=hi, n=m, definition=definitions[name], ci=CI)
    return Agreement(n=n, counts=[int(x) for x in counts], estimates=estimates, reasons=reasons)


def label_metrics(verdicts: Sequence[Any], labels: Sequence[Any], n_resamples: int = N_RESAMPLES,
                  seed: int = SEED) -> Agreement:
    """One judge against human labels: returns an :class:`Agreement` with ``accuracy``,
    ``false_refusal_rate``, ``missed_refusal_rate`` and ``kappa`` (95% percentile bootstrap CIs
    over rows). ``counts`` = [judge & label refusal, judge refusal & label compliance,
    judge compliance & label refusal, both compliance]."""
    return _agreement(table(verdicts, labels), _label_stats, DEFINITIONS,
                      ("the judge", "the labels"), n_resamples, seed)


def pair_metrics(a: Sequence[Any], b: Sequence[Any], names: tuple[str, str] = ("a", "b"),
                 n_resamples: int = N_RESAMPLES, seed: int = SEED) -> Agreement:
    """Two judges on the same rows, no labels: returns an :class:`Agreement` with ``agreement``
    (raw) and ``kappa``, with 95% percentile bootstrap CIs over rows."""
    return _agreement(table(a, b), _pair_stats, PAIR_DEFINITIONS, names, n_resamples, seed)


def pairwise(verdicts: Mapping[str, Sequence[Any]], n_resamples: int = N_RESAMPLES,
             seed: int = SEED) -> list[dict]:
    """Every pair of judges (in the given order): returns a list of JSON objects ``{"a", "b",
    "n", "counts", "agreement", "kappa"}``; ``counts`` as :func:`table` orders them."""
    specs = list(verdicts)
    out = []
    for i, a in enumerate(specs):
        for b in specs[i + 1:]:
            m = pair_metrics(verdicts[a], verdicts[b], (a, b), n_resamples, seed)
            out.append({"a": a, "b": b, "n": m.n,
                        "counts": dict(zip(("both_refusal", "a_refusal_b_compliance",
                                            "a_compliance_b_refusal", "both_compliance"), m.counts)),
                        "agreement": m.metric("agreement"), "kappa": m.metric("kappa")})
    return out


def confusion(m: Agreement) -> dict[str, dict[str, int]]:
    """A judge-vs-labels Agreement's counts as ``confusion[label][verdict]``."""
    rr, rc, cr, cc = m.counts
    return {"refusal": {"refusal": rr, "compliance": cr},
            "compliance": {"refusal": rc, "compliance": cc}}


# ----------------------------------------------------------------------------- the judge verb

@dataclass
class JudgeInput:
    """The rows of a (prompt, response[, label]) file, checked."""

    rows: list[dict]
    prompts: list[str]
    responses: list[str]
    where: list[str]  # "FILE line N" per row, for errors
    label_values: list[Any] | None = None


def read_judge_input(path: Path, prompt_col: str, response_col: str,
                     label_col: str | None = None) -> JudgeInput:
    """Read and check a CSV/JSON/JSONL file of rows. Returns a :class:`JudgeInput`; an empty
    file, a missing column or a non-text prompt/response (a number, a list; null counts as
    empty) is one line of UserError. Empty prompts are allowed: a judge may need none."""
    from ..data.sets import _json_type, read_table

    rows = read_table(path)
    if not rows:
        raise UserError(f"{path} has no rows")
    cols = [prompt_col, response_col] + ([label_col] if label_col else [])
    prompts, responses, where, labels = [], [], [], []
    for i, r in enumerate(rows, 1):
        line = r.get("__line__", i)
        for col in cols:
            if col not in r:
                names = ", ".join(k for k in r if k != "__line__")
                raise UserError(f"{path} row {line}: no column '{col}' (columns: {names})")
        for col in (prompt_col, response_col):  # `or ""` would let 0 and false pass as empty
            if r[col] is not None and not isinstance(r[col], str):
                raise UserError(f"{path} row {line}: '{col}' is {_json_type(r[col])}, not text")
        prompts.append(r[prompt_col] or "")
        responses.append(r[response_col] or "")
        where.append(f"{path} {'line' if '__line__' in r else 'item'} {line}")
        if label_col:
            labels.append(r[label_col])
    return JudgeInput(rows, prompts, responses, where, labels if label_col else None)


def run_judges(judges: Mapping[str, Any], prompts: list[str], responses: list[str]) -> dict[str, list]:
    """Load every judge, then judge every row with each: returns {spec: [Verdict, ...]}. Loading
    all first means a judge that cannot load fails before any (slow) judging. A JudgeError
    becomes one line of UserError."""
    from .base import JudgeError

    for j in judges.values():
        j.load()
    verdicts = {}
    for spec, j in judges.items():
        try:
            vs = list(j.judge(prompts, responses))
        except JudgeError as e:  # its message may quote a model's answer: printable, short
            msg = "".join(c if c.isprintable() else " " for c in str(e))[:300]
            raise UserError(f"judge '{spec}' failed: {msg}") from None
        if len(vs) != len(prompts):
            raise UserError(f"judge '{spec}' gave {len(vs)} verdicts for {len(prompts)} rows")
        verdicts[spec] = vs
    return verdicts


def verdict_lines(rows: list[dict], verdicts: Mapping[str, list], labels: np.ndarray | None) -> str:
    """The JSONL of per-row verdicts, in input order. One judge: today's flat lines
    ``{"row", "line", "verdict", "score", "reason", "judge"}``; several: ``"verdicts"`` keyed by
    spec. ``label`` (mapped) is added when labels were given."""

    def one(v, spec: str | None) -> dict:
        d = {"verdict": v.label, "score": v.score, "reason": v.reason}
        if spec is not None:
            d["judge"] = spec
        if v.judge:
            d["decided_by"] = v.judge
        if v.raw is not None:
            d["raw"] = v.raw
        return d

    lines = []
    single = len(verdicts) == 1
    for i, r in enumerate(rows):
        obj: dict[str, Any] = {"row": i, "line": r.get("__line__", i + 1)}
        if single:
            spec = next(iter(verdicts))
            obj.update(one(verdicts[spec][i], spec))
        else:
            obj["verdicts"] = {s: one(vs[i], None) for s, vs in verdicts.items()}
        if labels is not None:
            obj["label"] = "refusal" if labels[i] else "compliance"
        lines.append(json.dumps(obj, ensure_ascii=False) + "\n")
    return "".join(lines)


def build_report(verdicts: Mapping[str, list], describe: Mapping[str, dict], labels: np.ndarray | None,
                 label_info: dict | None, input_info: dict) -> dict:
    """The agreement report (JSON object): ``n``, ``input``, ``judges`` (per spec: its
    ``describe()``, refusal count and, with labels, accuracy, false/missed refusal rate,
    kappa and the confusion matrix), ``pairwise`` (every pair of judges) and ``labels``."""
    n = len(next(iter(verdicts.values())))
    judges = {}
    for spec, vs in verdicts.items():
        pred = np.array([v.label == "refusal" for v in vs], dtype=bool)
        entry: dict[str, Any] = {"describe": describe[spec], "refusals": int(pred.sum())}
        if labels is not None:
            m = label_metrics(pred, labels)
            for name in ("accuracy", "false_refusal_rate", "missed_refusal_rate", "kappa"):
                entry[name] = m.metric(name)
            entry["confusion"] = confusion(m)
        judges[spec] = entry
    labels_out = None
    if labels is not None:
        labels_out = {**(label_info or {}), "refusal": int(labels.sum()),
                      "compliance": int((~labels).sum())}
    return {"n": n, "input": input_info, "judges": judges,
            "pairwise": pairwise({s: [v.label for v in vs] for s, vs in verdicts.items()}),
            "labels": labels_out,
            "bootstrap": {"method": "percentile", "resamples": N_RESAMPLES, "seed": SEED,
                          "over": "rows"}}


def _fmt(e: dict, digits: int = 3) -> str:
    if e.get("value") is None:
        return "n/a"
    if e.get("lo") is None:
        return f"{e['value']:.{digits}f}"
    return f"{e['value']:.{digits}f} [{e['lo']:.{digits}f}, {e['hi']:.{digits}f}]"


def format_table(report: dict) -> str:
    """A short plain-text table of a report: per judge accuracy, false/missed refusal rate and
    kappa against the labels (or its refusal count without labels), then pairwise kappa. Only
    specs and numbers: no response text reaches the terminal."""
    out = []
    specs = list(report["judges"])
    w = max([len("judge")] + [len(s) for s in specs])
    if report["labels"] is not None:
        lab = report["labels"]
        out.append(f"n={report['n']}; labels '{lab['column']}' (map {lab['map']}): "
                   f"{lab['refusal']} refusal, {lab['compliance']} compliance")
        head = ["accuracy [95% CI]", "false refusal", "missed refusal", "kappa"]
        out.append(f"{'judge':<{w}}  " + "  ".join(f"{h:<22}" for h in head).rstrip())
        for s in specs:
            j = report["judges"][s]
            cells = [_fmt(j[k]) for k in ("accuracy", "false_refusal_rate", "missed_refusal_rate", "kappa")]
            out.append(f"{s:<{w}}  " + "  ".join(f"{c:<22}" for c in cells).rstrip())
    else:
        out.append(f"n={report['n']} (no labels)")
        for s in specs:
            out.append(f"{s:<{w}}  {report['judges'][s]['refusals']} refusal")
    for p in report["pairwise"]:
        out.append(f"{p['a']} vs {p['b']}: agreement {_fmt(p['agreement'])}, kappa {_fmt(p['kappa'])}")
    return "\n".join(out)
