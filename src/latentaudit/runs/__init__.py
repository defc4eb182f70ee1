"""Run folders: resolved config, the SQLite results store, summary.json with provenance."""

from .store import ResultStore
from .run import Run, open_run

__all__ = ["ResultStore", "Run", "open_run"]
