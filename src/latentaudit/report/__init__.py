"""Reports of finished runs: ``latentaudit report`` (one self-contained HTML file) and
``latentaudit compare`` (the headline numbers of several runs as a table, CSV, Markdown or JSON).
Both read a run folder only: ``summary.json`` for the numbers, ``store.sqlite`` (read-only) for
sample transcripts."""

from __future__ import annotations

from .compare import Headline, compare_runs, format_rows, headlines, load_summary

__all__ = ["Headline", "build_report", "compare_runs", "format_rows", "headlines", "load_summary",
           "render_report"]


def build_report(*args, **kwargs):
    from .html import build_report as _build

    return _build(*args, **kwargs)


def render_report(*args, **kwargs):
    from .html import render_report as _render

    return _render(*args, **kwargs)
