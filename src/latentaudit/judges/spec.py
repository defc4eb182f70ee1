"""Judge specs: ``KIND`` or ``KIND:TARGET`` strings, and the config's composite forms.

- ``substring``, ``classifier:PATH_OR_HUB_ID``, ``guard:PATH_OR_HUB_ID``, ``seqcls:PATH_OR_HUB_ID``,
  ``api:strongreject`` / ``api:refusal`` (the rubric) — one judge;
- ``{name: SPEC, fallback: SPEC}`` — the primary judge, and the fallback for the rows it cannot
  judge;
- ``{ensemble: [SPEC, ...], rule: majority|all}`` — several judges, one verdict per row.
"""

from __future__ import annotations

from typing import Any

from .. import registry
from ..errors import UserError
from .base import Judge, JudgeOptions


def split_spec(spec: str) -> tuple[str, str | None]:
    """``"guard:meta-llama/Llama-Guard-3-1B"`` → ``("guard", "meta-llama/Llama-Guard-3-1B")``."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"a judge spec must be a non-empty string (got {spec!r})")
    kind, sep, target = spec.strip().partition(":")
    return kind, (target if sep else None)


def make_judge(spec: Any, options: JudgeOptions | None = None) -> Judge:
    """The judge a spec names, not yet loaded (call ``load()`` before judging)."""
    options = options or JudgeOptions()
    if isinstance(spec, dict):
        from .compose import from_config

        return from_config(spec, options)
    kind, target = split_spec(spec)
    cls = registry.get("judge", kind)
    if getattr(cls, "takes_target", False):
        if not target:
            raise UserError(f"judge '{kind}' needs a target: {kind}:{getattr(cls, 'needs', 'TARGET')}")
        return cls(target=target, options=options)
    if target:
        raise UserError(f"judge '{kind}' takes no target (got '{spec}')")
    return cls()


def judge_label(judge: Judge) -> str:
    """The short name a table shows for a judge: its spec."""
    d = judge.describe()
    t = d.get("parameters", {}).get("target")
    return f"{d['name']}:{t}" if t else d["name"]
