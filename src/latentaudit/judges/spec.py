"""Judge specs: ``KIND`` or ``KIND:TARGET`` strings, and the config's composite forms.

- ``substring``, ``classifier:PATH_OR_HUB_ID``, ``guard:PATH_OR_HUB_ID``, ``seqcls:PATH_OR_HUB_ID``,
  ``api:strongreject`` / ``api:refusal`` (the rubric) — one judge;
- ``{name: SPEC, fallback: SPEC}`` — the primary judge, and the fallback for the rows it cannot
  judge;
- ``{ensemble: [SPEC, ...], rule: majority|all}`` — several judges, one verdict per row
  (built by :mod:`.compose`, which depends on this module and not the other way round).
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
    """The judge a spec names, not yet loaded (call ``load()`` before judging). A mapping (the
    config's composite forms) is built by :func:`latentaudit.judges.compose.from_config`."""
    options = options or JudgeOptions()
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
    return judge_spec(judge.describe())


def judge_spec(desc: dict) -> str:
    """A judge's description (as results record it) written as its spec: ``guard:PATH``,
    ``fallback(api:strongreject -> substring)``, ``majority(substring, guard:PATH)``."""
    if not isinstance(desc, dict) or "name" not in desc:
        return str(desc)
    p = desc.get("parameters") or {}
    if desc["name"] == "fallback" and "primary" in p:
        return f"fallback({judge_spec(p['primary'])} -> {judge_spec(p['fallback'])})"
    if desc["name"] == "ensemble" and "judges" in p:
        return f"{p.get('rule', 'majority')}({', '.join(judge_spec(j) for j in p['judges'])})"
    t = p.get("target")
    return f"{desc['name']}:{t}" if t else str(desc["name"])
