"""Progress bars (rich) with a plain mode for logs and CI.

``progress_factory(mode)`` returns a context-manager factory: ``with factory(desc, total) as
advance: advance(n)``. Mode ``auto`` shows bars on a terminal and plain lines elsewhere.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator


def progress_factory(mode: str = "auto"):
    if mode not in ("auto", "rich", "plain", "none"):
        from .errors import UserError

        raise UserError(f"unknown progress mode '{mode}' (auto, rich, plain, none)")
    if mode == "auto":
        mode = "rich" if sys.stderr.isatty() else "plain"

    @contextlib.contextmanager
    def factory(desc: str, total: int) -> Iterator[Callable[[int], None]]:
        if mode == "none" or total <= 0:
            yield lambda n=1: None
            return
        if mode == "plain":
            state = {"done": 0, "last": -1.0, "t0": time.time(), "replayed": 0}

            def advance(n: int = 1) -> None:
                el = time.time() - state["t0"]
                if state["done"] == 0 and el < 1.0:  # read back from the store, not timed
                    state["replayed"] = n
                state["done"] += n
                frac = state["done"] / total
                if frac - state["last"] >= 0.1 or state["done"] >= total:
                    state["last"] = frac
                    timed = state["done"] - state["replayed"]
                    left = (f", ~{hms(el / timed * (total - state['done']))} left"
                            if timed > 0 and state["done"] < total else "")
                    print(f"[{desc}] {state['done']}/{total} ({hms(el)}{left})",
                          file=sys.stderr, flush=True)

            yield advance
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TimeRemainingColumn(), transient=False) as prog:
            task = prog.add_task(desc, total=total)
            yield lambda n=1: prog.advance(task, n)

    return factory


def hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def unit_line(who: str, unit: str, done: int, total: int, unit_s: float, elapsed: float,
              where: str = "") -> str:
    """One line per finished unit (a model, an executor's task): its time, the elapsed time
    and the time left if the units to come take as long on average as those done (rough:
    units differ)."""
    rest = elapsed / max(done, 1) * (total - done)
    return (f"{who}: {done}/{total} {unit} ({unit_s:.0f} s{where}) · elapsed {hms(elapsed)}"
            + (f" · remaining ~{hms(rest)}" if done < total else ""))
