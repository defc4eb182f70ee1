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
            state = {"done": 0, "last": -1.0, "t0": time.time()}

            def advance(n: int = 1) -> None:
                state["done"] += n
                frac = state["done"] / total
                if frac - state["last"] >= 0.1 or state["done"] >= total:
                    state["last"] = frac
                    print(f"[{desc}] {state['done']}/{total} ({time.time() - state['t0']:.0f}s)",
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
