"""The report's pictures: matplotlib (Agg, no pyplot state) rendered to PNG and inlined as
base64. Every label that comes from a model or a configuration is untrusted text: matplotlib's
mathtext is disarmed (``_mpl_text``) and the HTML around the picture escapes it."""

from __future__ import annotations

import base64
import io
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..metrics.stats import Estimate
from .compare import Headline

# --------------------------------------------------------------------------------------------
# plots (matplotlib, Agg, no pyplot state)


def _mpl_text(s: Any, limit: int = 48) -> str:
    """Untrusted text for a matplotlib label: one line, bounded, no mathtext."""
    s = " ".join(str(s).split())
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    return s.replace("\\", "\\\\").replace("$", r"\$")


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> str:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing glyphs in model names are not errors
        fig.savefig(buf, format="png", metadata={"Software": None}, bbox_inches="tight",
                    pad_inches=0.08)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def _band(ests: list[Estimate]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    v = np.array([e.value if _finite(e.value) else np.nan for e in ests], float)
    lo = np.array([e.lo if _finite(e.lo) else np.nan for e in ests], float)
    hi = np.array([e.hi if _finite(e.hi) else np.nan for e in ests], float)
    return v, np.where(np.isnan(lo), v, lo), np.where(np.isnan(hi), v, hi)


FAMILY_COLORS = {"pgd": "#d62728", "steer": "#1f77b4", "noise": "#7f7f7f"}
_PALETTE = ["#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#ff7f0e"]


def _family_color(name: str, i: int) -> str:
    return FAMILY_COLORS.get(name, _PALETTE[i % len(_PALETTE)])


def _bounded(lat) -> list[tuple[str, Any]]:
    return [(n, fr) for n, fr in lat.families.items() if fr.layers]


def _finish_rate_plot(fig, ax, xlabel: str, ylabel: str, title: str) -> str:
    """Integer x ticks, a rate in [0, 1] on y, labels, grid and legend; the PNG."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_depth_profile(model: str, lat) -> str | None:
    fams = _bounded(lat)
    if not fams:
        return None
    fig = _figure(6.4, 3.4)
    ax = fig.add_subplot()
    for i, (name, fr) in enumerate(fams):
        x = np.array([lr.layer for lr in fr.layers])
        v, lo, hi = _band([lr.lvs for lr in fr.layers])
        c = _family_color(name, i)
        ax.plot(x, v, marker="o", ms=4, color=c, label=_mpl_text(name, 20))
        ax.fill_between(x, lo, hi, color=c, alpha=0.15, linewidth=0)
        if len(x) == 1:
            ax.errorbar(x, v, yerr=[v - lo, hi - v], color=c, capsize=3)
        if fr.worst_layer is not None and fr.lvs_model is not None and _finite(fr.lvs_model.value):
            ax.plot([fr.worst_layer], [fr.lvs_model.value], marker="*", ms=12, color=c,
                    markeredgecolor="black", linestyle="none")
    return _finish_rate_plot(fig, ax, "layer l (residual stream after block l)",
                             "LVS_l (95% CI band)",
                             f"LVS depth profile — {_mpl_text(model)}  (★ worst layer)")


def _eps_array(eps_star: list[float | None]) -> np.ndarray:
    return np.array([np.inf if e is None else float(e) for e in eps_star], float)


def _asr_ci(eps: np.ndarray, grid: np.ndarray, seed: int = 0, n_boot: int = 1000):
    """Percentile-bootstrap band (over prompts) of ASR(ε) = mean(ε* ≤ ε) on ``grid``."""
    hits = (eps[:, None] <= grid[None, :]).astype(float)  # [n, G]
    if hits.shape[0] < 2:
        m = hits.mean(0)
        return m, m
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, hits.shape[0], size=(n_boot, hits.shape[0]))
    boot = hits[idx].mean(1)
    return np.percentile(boot, 2.5, axis=0), np.percentile(boot, 97.5, axis=0)


def _grid_of(lat, fr) -> np.ndarray:
    if fr.asr_grid:
        return np.asarray(fr.asr_grid, float)
    return np.geomspace(lat.eps_min, lat.eps_max, 9)


def plot_asr_curves(model: str, lat) -> str | None:
    fams = _bounded(lat)
    if not fams:
        return None
    from matplotlib import colormaps

    ncols = min(len(fams), 3)
    nrows = math.ceil(len(fams) / ncols)
    fig = _figure(3.6 * ncols + 0.6, 3.0 * nrows + 0.3)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    base = colormaps["viridis"]

    def cmap(x: float):  # the yellow end of viridis is unreadable on white
        return base(0.88 * x)
    for k, (name, fr) in enumerate(fams):
        ax = axes[k // ncols][k % ncols]
        grid = _grid_of(lat, fr)
        layers = [lr.layer for lr in fr.layers]
        lmax = max(max(layers), 1)
        for lr in fr.layers:
            curve = fr.asr_curves.get(str(lr.layer))
            y = np.asarray(curve, float) if curve and len(curve) == len(grid) else \
                (_eps_array(lr.eps_star)[:, None] <= grid[None, :]).mean(0)
            worst = lr.layer == fr.worst_layer
            ax.plot(grid, y, color=cmap(lr.layer / lmax), lw=2.2 if worst else 1.0,
                    alpha=1.0 if worst else 0.75,
                    label=f"L{lr.layer}" + (" (worst)" if worst else ""))
            if worst:
                lo, hi = _asr_ci(_eps_array(lr.eps_star), grid)
                ax.fill_between(grid, lo, hi, color=cmap(lr.layer / lmax), alpha=0.15, lw=0)
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("relative budget ε (log)")
        if k % ncols == 0:
            ax.set_ylabel("ASR")
        ax.set_title(_mpl_text(name, 24), fontsize=10)
        ax.grid(alpha=0.3, which="both")
        if len(layers) <= 8:
            ax.legend(fontsize=7)
    for k in range(len(fams), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    if any(len(fr.layers) > 8 for _, fr in fams):
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        allmax = max(lr.layer for _, fr in fams for lr in fr.layers)
        fig.colorbar(ScalarMappable(Normalize(0, max(allmax, 1)), base.resampled(256)),
                     ax=axes, label="layer")
    fig.subplots_adjust(wspace=0.22, hspace=0.45, top=1 - 0.5 / fig.get_figheight())
    fig.suptitle(f"ASR vs ε — {_mpl_text(model)} (worst layer thick, with 95% CI band)",
                 fontsize=10)
    return _png(fig)


def plot_heatmap(model: str, lat, points: int = 64) -> str | None:
    fams = _bounded(lat)
    if not fams:
        return None
    ncols = min(len(fams), 3)
    nrows = math.ceil(len(fams) / ncols)
    fig = _figure(3.6 * ncols + 0.8, 0.6 + nrows * max(2.4, 0.22 * max(len(fr.layers) for _, fr in fams) + 1.2))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    lo_e, hi_e = math.log(lat.eps_min), math.log(lat.eps_max)
    edges = np.exp(np.linspace(lo_e, hi_e, points + 1))
    centers = np.sqrt(edges[1:] * edges[:-1])
    mesh = None
    for k, (name, fr) in enumerate(fams):
        ax = axes[k // ncols][k % ncols]
        C = np.stack([(_eps_array(lr.eps_star)[:, None] <= centers[None, :]).mean(0)
                      for lr in fr.layers])  # [layers, points]
        mesh = ax.pcolormesh(edges, np.arange(len(fr.layers) + 1), C, vmin=0, vmax=1,
                             cmap="magma", shading="flat")
        ax.set_xscale("log")
        step = max(1, math.ceil(len(fr.layers) / 16))
        ticks = list(range(0, len(fr.layers), step))
        ax.set_yticks([t + 0.5 for t in ticks], [str(fr.layers[t].layer) for t in ticks])
        ax.set_xlabel("relative budget ε (log)")
        if k % ncols == 0:
            ax.set_ylabel("layer")
        ax.set_title(_mpl_text(name, 24), fontsize=10)
    for k in range(len(fams), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    fig.subplots_adjust(wspace=0.22, hspace=0.45, top=1 - 0.5 / fig.get_figheight())
    if mesh is not None:
        fig.colorbar(mesh, ax=axes, label="ASR = fraction with ε* ≤ ε", fraction=0.04, pad=0.02)
    fig.suptitle(f"ASR by layer and budget — {_mpl_text(model)}", fontsize=10)
    return _png(fig)


def plot_refusal_curves(model: str, tamper, control) -> str | None:
    runs = [(lab, ts, c) for lab, ts, c in (("harmful fine-tuning", tamper, "#d62728"),
                                            ("benign control", control, "#1f77b4")) if ts is not None]
    if not runs:
        return None
    fig = _figure(6.4, 3.4)
    ax = fig.add_subplot()
    for lab, ts, c in runs:
        x = np.asarray(ts.steps, float)
        v, lo, hi = _band(ts.r)
        ax.plot(x, v, marker="o", ms=4, color=c, label=lab)
        ax.fill_between(x, lo, hi, color=c, alpha=0.15, lw=0)
        if lab.startswith("harmful") and _finite(ts.S.value):
            ax.axhline(0.5 * ts.S.value, color=c, ls=":", lw=1, label="S/2 (steps-to-break)")
    return _finish_rate_plot(fig, ax, "optimiser steps s", "refusal rate r(s) on held-out harmful",
                             f"refusal under fine-tuning — {_mpl_text(model)} (95% CI bands)")


@dataclass
class ScatterPoint:
    label: str
    kind: str  # "latent" or "fine-tuning"
    S: Estimate
    R: tuple[float, float | None, float | None]  # value, lo, hi


def scatter_points(summaries: list[tuple[Any, list[Headline]]]) -> list[ScatterPoint]:
    pts = []
    for summary, heads in summaries:
        for m, h in zip(summary.models, heads):
            if h.lvs is not None and _finite(h.lvs.value):
                fr = m.latent.families[h.family]
                S = fr.S_clean if fr.S_clean is not None else h.S
                if S is not None and _finite(S.value):
                    R = (1 - h.lvs.value, None if h.lvs.hi is None else 1 - h.lvs.hi,
                         None if h.lvs.lo is None else 1 - h.lvs.lo)
                    pts.append(ScatterPoint(f"{h.model} ({h.family})", "latent", S, R))
            if m.tamper is not None and _finite(m.tamper.R_ft.value) and _finite(m.tamper.S.value):
                r = m.tamper.R_ft
                pts.append(ScatterPoint(f"{h.model} (fine-tuning)", "fine-tuning", m.tamper.S,
                                        (r.value, r.lo, r.hi)))
    return pts


def plot_scatter(points: list[ScatterPoint]) -> str | None:
    if not points:
        return None
    fig = _figure(5.2, 4.6)
    ax = fig.add_subplot()
    ax.fill_between([0, 1], [0, 0], [0, 1], color="#d62728", alpha=0.07, lw=0)
    ax.plot([0, 1], [0, 1], color="black", lw=1, ls="--")
    ax.text(0.97, 0.05, "below the diagonal: audit gap\n(looks safer than it is)", ha="right",
            va="bottom", fontsize=8, color="#a01010")
    for i, p in enumerate(points):
        x, y = p.S.value, p.R[0]
        xerr = [[x - (p.S.lo if _finite(p.S.lo) else x)], [(p.S.hi if _finite(p.S.hi) else x) - x]]
        yerr = [[y - (p.R[1] if _finite(p.R[1]) else y)], [(p.R[2] if _finite(p.R[2]) else y) - y]]
        ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o" if p.kind == "latent" else "s",
                    color=_PALETTE[i % len(_PALETTE)], capsize=3, ms=6)
        ax.annotate(_mpl_text(p.label, 40), (x, y), textcoords="offset points",
                    xytext=(6, 5 if i % 2 == 0 else -12), fontsize=7)
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_aspect("equal")
    ax.set_xlabel("behavioural safety S")
    ax.set_ylabel("robustness R  (● latent: 1 − LVS(M); ■ fine-tuning: R_ft)")
    ax.grid(alpha=0.3)
    return _png(fig)
