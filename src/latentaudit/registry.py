"""Plug-ins addressed by name: judges, perturbation families and zoo recipes.

The registry is a leaf: it names the built-in plug-ins by import path and loads a class only
when it is asked for, so asking for a judge never loads the zoo trainer, and no plug-in module
imports this one. A plug-in declares its metadata as class attributes (``name``, ``doc``).

A third party adds one without editing latentaudit, through an entry point in its own
``pyproject.toml``::

    [project.entry-points."latentaudit.families"]
    mypush = "mypackage.attacks:MyPush"

(groups: ``latentaudit.judges``, ``latentaudit.families``, ``latentaudit.recipes``), or at run
time with :func:`register`. ``latentaudit ls KIND`` lists them all.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, Callable, TypeVar

from .errors import UserError

T = TypeVar("T")

# kind -> entry-point group of third-party plug-ins
GROUPS = {"judge": "latentaudit.judges", "family": "latentaudit.families",
          "recipe": "latentaudit.recipes"}
KINDS = tuple(GROUPS)

BUILTIN: dict[str, dict[str, str]] = {
    "judge": {
        "substring": "latentaudit.judges.refusal:SubstringJudge",
        "classifier": "latentaudit.judges.classifier:YesNoClassifierJudge",
        "guard": "latentaudit.judges.classifier:GuardJudge",
        "seqcls": "latentaudit.judges.classifier:SequenceClassifierJudge",
        "api": "latentaudit.judges.api:ApiJudge",
    },
    "family": {
        "noise": "latentaudit.interventions.families:Noise",
        "steer": "latentaudit.interventions.families:Steer",
        "pgd": "latentaudit.interventions.families:PGD",
        "ablate": "latentaudit.interventions.families:Ablate",
    },
    "recipe": {
        "safe": "latentaudit.construct.recipes:Safe",
        "dissociated": "latentaudit.construct.recipes:Dissociated",
        "hardened": "latentaudit.construct.recipes:Hardened",
        "abliterated": "latentaudit.construct.recipes:Abliterated",
        "rescaled": "latentaudit.construct.rescaled:Rescaled",
        "dissociated-trained": "latentaudit.construct.recipes:DissociatedTrained",
    },
}

# classes registered at run time (tests, notebooks): they shadow a path of the same name
_REGISTERED: dict[str, dict[str, type]] = {k: {} for k in KINDS}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown plug-in kind {kind!r} (kinds: {', '.join(KINDS)})")


def register(kind: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: register ``cls`` under ``kind`` by its ``name`` attribute."""
    _check_kind(kind)

    def deco(cls: type[T]) -> type[T]:
        name = getattr(cls, "name", None)
        if not name:
            raise TypeError(f"{cls.__name__} needs a class attribute `name` to be registered")
        _REGISTERED[kind][name] = cls
        return cls

    return deco


def _paths(kind: str) -> dict[str, str]:
    """name -> "module:Class" for the built-ins and the installed entry points of ``kind``."""
    found = dict(BUILTIN[kind])
    for ep in entry_points(group=GROUPS[kind]):
        found.setdefault(ep.name, ep.value)
    return found


def _load(path: str) -> type:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def names(kind: str) -> list[str]:
    _check_kind(kind)
    return sorted(set(_paths(kind)) | set(_REGISTERED[kind]))


def get(kind: str, name: str) -> type:
    _check_kind(kind)
    if name in _REGISTERED[kind]:
        return _REGISTERED[kind][name]
    path = _paths(kind).get(name)
    if path is None:
        raise UserError(f"unknown {kind} '{name}' (known: {', '.join(names(kind)) or 'none'})")
    return _load(path)


def create(kind: str, name: str, **kwargs: Any) -> Any:
    return get(kind, name)(**kwargs)


def available(kind: str) -> dict[str, type]:
    """Every plug-in of ``kind``, loaded (for listing)."""
    return {n: get(kind, n) for n in names(kind)}
