"""Where an audit's units run: one process (the default) or Ray actors (:mod:`.ray_backend`);
:mod:`.units` defines the units, :mod:`.driver` schedules them and alone writes the run folder.
The pipeline never imports this package: it is handed an executor (:func:`run_config`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class RayExecutor:
    """``executor: {kind: ray}`` for :func:`latentaudit.pipeline.run_many`."""

    def __init__(self, acfg, command: str):
        self.acfg, self.command, self._factory = acfg, command, None

    def check(self) -> None:
        from .ray_backend import RayBackend

        self._factory = RayBackend.check(self.acfg.executor)

    def run(self, run, entries, cfgs, stages, write_summary) -> Any:
        from .driver import run_units

        return run_units(self.acfg, entries, cfgs, stages, run, self.command, self._factory(),
                         write_summary)


def run_config(acfg, command: str) -> tuple[Path, Any]:
    """An audit config on the executor it names; (run folder, Summary)."""
    from ..pipeline import run_many

    ex = RayExecutor(acfg, command) if acfg.executor.kind == "ray" else None
    return run_many(acfg, command, executor=ex)
