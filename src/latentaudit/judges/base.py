"""The judge interface: a judge maps (prompt, response) pairs to refusal/compliance verdicts.

A judge is named by a spec, ``KIND`` or ``KIND:TARGET`` (``substring``,
``classifier:cais/HarmBench-Mistral-7b-val-cls``, ``guard:PATH``, ``api:strongreject``), and
built by :func:`latentaudit.judges.spec.make_judge` with the run's :class:`JudgeOptions`. A judge
backed by a model or a server does its expensive or fallible setup in :meth:`Judge.load`, which
the pipeline calls once before any work starts, so that a judge that cannot load is one line and
exit 2 before a single response is generated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Label = Literal["refusal", "compliance"]


@dataclass(frozen=True)
class Verdict:
    """One judged response.

    ``score`` is a refusal score in [0, 1]; ``score >= 0.5`` if and only if ``label == "refusal"``.
    ``reason`` is a short machine-readable reason, e.g. ``"phrase:i cannot"``, ``"empty"``, ``"none"``.
    ``judge`` names the judge that produced it when a composite judge (fallback, ensemble) decided
    (empty: the judge that was asked). ``raw`` is a model-backed judge's raw answer, kept as
    evidence (the judge's own text, untrusted like any model output).
    """

    label: Label
    score: float
    reason: str
    judge: str = ""
    raw: str | None = None


class JudgeError(RuntimeError):
    """A judge could not give a verdict on some rows (a server that never answered, an answer
    that does not parse). A composite judge with a fallback catches it per row; otherwise the
    run stops with one line, and the verdicts already stored are kept."""

    def __init__(self, message: str, rows: list[int] | None = None):
        super().__init__(message)
        self.rows = rows or []


@dataclass(frozen=True)
class JudgeOptions:
    """Settings shared by the model- and server-backed judges (``--judge-*`` flags)."""

    device: str = "auto"  # where a judge's own model runs (cpu, cuda, cuda:N); auto: the audit's
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    batch_size: int = 8
    max_response_tokens: int = 512  # a longer response is truncated (its head kept) before judging
    url: str | None = None  # OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1
    model: str | None = None  # the model name the server serves
    key_env: str = "OPENAI_API_KEY"  # the API key's environment variable (never stored)
    timeout_s: float = 60.0
    retries: int = 4
    extra: dict = field(default_factory=dict)


class Judge:
    """Base class of judges. Subclasses set ``name`` and ``doc`` and implement :meth:`judge`.

    A judge that takes a target (a model path or hub id, a rubric name) is constructed as
    ``cls(target=..., options=JudgeOptions(...))``; one that takes none, as ``cls()``.
    """

    name: str = ""  # registry name: the KIND of a spec
    doc: str = ""  # one line shown by `latentaudit ls judges`
    needs: str = ""  # what a spec of this kind needs, shown by `latentaudit ls judges`
    takes_target: bool = False  # whether the spec is KIND:TARGET

    def load(self) -> None:
        """Load weights / reach the server; raise :class:`~latentaudit.errors.UserError` with one
        line if that cannot be done. Called once, before any work. Idempotent."""

    def judge(self, prompts: list[str], responses: list[str]) -> list[Verdict]:
        """One verdict per (prompt, response) pair, in order."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Name, version and parameters (a model-backed judge: its model's fingerprint and its
        prompt's version), recorded in the provenance of every result. Two judges whose
        descriptions differ never share stored verdicts."""
        return {"name": self.name, "version": getattr(self, "version", "0"), "parameters": {}}
