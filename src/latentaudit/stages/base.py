"""The shape every stage has: a name, the section of the configuration it reads, a check of its
input that runs before any model loads, and ``run(ctx, cfg)`` that records its results.

The pipeline (:mod:`latentaudit.pipeline`) is a loop over stages; what they share — the model,
the run folder and its store, the judge, the refusal directions, the coherence guard, progress —
comes in one :class:`StageContext`; what is costly to compute (directions, the guard) is
computed once, when a stage first asks for it (:meth:`StageContext.once`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..models.loader import LoadedModel
    from ..runs.run import Run


@dataclass
class StageContext:
    cfg: "RunConfig"
    lm: "LoadedModel"
    model_key: str
    run: "Run"
    judge: Any
    # record(field, result): the result goes into this model's summary, written at once
    record: Callable[[str, Any], None]
    progress: Callable | None = None
    # (i, k): a stage that can split its prompts runs only the i-th of k contiguous chunks of
    # them (an executor's unit); None: all of them
    chunk: tuple[int, int] | None = None
    _once: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def store(self):
        return self.run.store

    @property
    def seed(self) -> int:
        return self.cfg.seed

    @property
    def system(self) -> str | None:
        return self.cfg.behave.system

    def once(self, name: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` the first time ``name`` is asked for in this context, then the same
        value (the refusal directions, the calibrated coherence guard)."""
        if name not in self._once:
            self._once[name] = compute()
        return self._once[name]


class Stage(ABC):
    """One stage of the audit. ``check`` raises a one-line :class:`UserError` for input that
    cannot work, before any model loads or any folder is made; ``check_model`` does the same
    for what needs the loaded model (layer ranges, shapes); ``run`` computes and records."""

    name: ClassVar[str] = ""
    section: ClassVar[str] = ""  # the RunConfig field this stage reads

    def check(self, cfg: "RunConfig") -> None:
        pass

    def check_model(self, cfg: "RunConfig", lm: "LoadedModel") -> None:
        pass

    def summary_fields(self, cfg: "RunConfig") -> list[str] | None:
        """The fields of a model's summary entry this stage fills once it has finished (each is
        written only then): a rerun skips a model whose entry has them all. None: its end
        cannot be read from the summary, so a rerun always runs it (from the store)."""
        return None

    @abstractmethod
    def run(self, ctx: StageContext, cfg: Any) -> None:
        """Compute this stage for ``ctx``'s model and ``ctx.record`` each result."""
