"""The driver: schedules an audit's units on a backend and alone writes the run folder.

A unit's records go into the store in one transaction with its marker
(``executor/<config hash>/<unit id>``), so a unit is in the store whole or not at all; a rerun
(after the driver was killed, or on another executor) schedules only the units without a marker.
A unit whose worker dies is run again from the records the store holds (nothing stored is lost,
nothing is stored twice: keys are primary keys). Summary units always run: they replay the
model from the store and write its entry of summary.json.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections import Counter
from typing import Any, Protocol

from ..errors import UserError
from ..files import write_bytes
from ..progress import unit_line
from .units import Result, Task, Unit, plan, records_for, shipped_files, task_config


class ExecutorFault(UserError):
    """A unit's worker died more often than ``executor.retries`` allows: not bad input (exit 1);
    every finished unit is in the store, so rerunning the same command resumes."""

    exit_code = 1


class WorkerLost(Exception):
    """The worker running a unit died (killed, out of memory, its node gone)."""


class Failure:
    """An error a worker raised on purpose (bad input, a judge that failed), sent back whole so
    the driver raises it as one line with its own exit code."""

    def __init__(self, e: BaseException):
        self.kind = "judge" if type(e).__name__ == "JudgeError" else "user"
        self.message = str(e)
        self.exit_code = getattr(e, "exit_code", 1)

    def raise_(self) -> None:
        if self.kind == "judge":
            from ..judges.base import JudgeError

            raise JudgeError(self.message)
        err = UserError(self.message)
        err.exit_code = self.exit_code
        raise err


class Backend(Protocol):
    def describe(self) -> str: ...
    def free(self) -> bool: ...
    def busy(self) -> bool: ...
    def submit(self, unit: Unit, task: Task) -> None: ...
    def next(self) -> tuple[Unit, Result | Failure | WorkerLost]: ...
    def close(self) -> None: ...


def marker_key(config_hash: str, unit: Unit) -> str:
    return f"executor/{config_hash}/{unit.id}"


def run_units(acfg, entries, cfgs, stages: list[str], run, command: str, backend: Backend,
              write_summary) -> Any:
    """Every unit of the audit on ``backend``; returns the run's Summary."""
    from ..data.sets import load_prompt_set
    from ..runs.summary import ModelSummary

    t0 = time.time()
    ex = acfg.executor
    n_harm = [len(load_prompt_set(c.latent.harmful, c.data_dir, c.behave.prompt_col, c.limit))
              if "latent" in stages else 0 for c in cfgs]
    units = plan([e.name for e in entries], stages, n_harm, list(acfg.latent.families), ex.chunk)
    keys: dict[int, str] = {}  # model index -> model key, as workers report it
    done: set[str] = set()
    for u in units:
        rec = run.store.get(marker_key(run.config_hash, u)) if u.kind != "summary" else None
        if rec is not None:
            done.add(u.id)
            keys[u.model] = rec["model_key"]
    pending = [u for u in units if u.id not in done]
    _say(f"executor: {len(pending)} of {len(units)} units to run on {backend.describe()}"
         + (f" ({len(done)} already in the store)" if done else ""))
    attempts: Counter[str] = Counter()
    summary = None
    n_total, n_done, busy_s = len(pending), 0, 0.0
    try:
        while pending or backend.busy():
            for u in [u for u in pending if all(d in done for d in u.deps)]:
                if not backend.free():
                    break
                pending.remove(u)
                backend.submit(u, Task(
                    u, task_config(cfgs[u.model], u), stages, command, run.config,
                    records_for(run.store, keys.get(u.model)), shipped_files(run.dir)))
            unit, out = backend.next()
            if isinstance(out, WorkerLost):
                attempts[unit.id] += 1
                if attempts[unit.id] > ex.retries:
                    raise ExecutorFault(
                        f"unit {unit.id}: its worker died {attempts[unit.id]} times ({out}); "
                        "every finished unit is in the run store: rerun the same command to "
                        "resume")
                _say(f"executor: {unit.id}: worker lost ({out}); running it again "
                     f"({attempts[unit.id]} of {ex.retries})")
                pending.insert(0, unit)
                continue
            if isinstance(out, Failure):
                out.raise_()
            for name, data in out.files.items():  # before the marker: a rerun rewrites them
                write_bytes(run.dir / name, data)
            marker = (marker_key(run.config_hash, unit), "executor",
                      {"model_key": out.model_key, "records": len(out.records),
                       "wall_s": out.wall_s, "worker": out.worker})
            run.store.put_many(out.records + [marker])
            done.add(unit.id)
            keys[unit.model] = out.model_key
            n_done += 1
            busy_s += out.wall_s
            if out.summary is not None:
                for w in out.warnings:
                    warnings.warn(w, stacklevel=1)
                summary = write_summary(run, acfg, command, t0,
                                        [ModelSummary.model_validate(out.summary)])
            _say(unit_line("executor", unit.id, n_done, n_total, out.wall_s, time.time() - t0,
                           f" on {out.worker or 'worker'}"))
    finally:
        backend.close()
    if summary is None:  # nothing ran (cannot happen: summary units always run)
        raise UserError("the executor ran no summary unit")
    return summary


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class SerialBackend:
    """Every unit in this process, one at a time: the unit path without a cluster (tests, and a
    check that a Ray run's units give the local executor's results)."""

    def __init__(self) -> None:
        self._queue: list[tuple[Unit, Task]] = []
        self._lm: dict[tuple, Any] = {}

    def describe(self) -> str:
        return "this process (serial units)"

    def free(self) -> bool:
        return not self._queue

    def busy(self) -> bool:
        return bool(self._queue)

    def submit(self, unit: Unit, task: Task) -> None:
        self._queue.append((unit, task))

    def next(self):
        from .units import run_task
        from .worker import held_model

        unit, task = self._queue.pop(0)
        from ..judges.base import JudgeError

        try:
            return unit, run_task(task, held_model(self._lm, task.cfg))
        except (UserError, JudgeError) as e:
            return unit, Failure(e)

    def close(self) -> None:
        self._lm.clear()
