"""The judge interface: a judge maps (prompt, response) pairs to refusal/compliance verdicts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Label = Literal["refusal", "compliance"]


@dataclass(frozen=True)
class Verdict:
    """One judged response.

    ``score`` is a refusal score in [0, 1]; ``score >= 0.5`` if and only if ``label == "refusal"``.
    ``reason`` is a short machine-readable reason, e.g. ``"phrase:i cannot"``, ``"empty"``, ``"none"``.
    """

    label: Label
    score: float
    reason: str


class Judge:
    """Base class of judges. Subclasses set ``name`` and ``doc`` and implement :meth:`judge`."""

    name: str = ""  # registry name
    doc: str = ""  # one line shown by `latentaudit ls judges`

    def judge(self, prompts: list[str], responses: list[str]) -> list[Verdict]:
        """One verdict per (prompt, response) pair, in order."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Name, version and parameters, recorded in the provenance of every result."""
        return {"name": self.name, "version": getattr(self, "version", "0"), "parameters": {}}
