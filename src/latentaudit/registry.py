"""Plug-ins addressed by name.

Every extension point (judges, prompt sets, perturbation families, zoo recipes, model sources)
is a small class registered under a name and kind; ``latentaudit ls KIND`` lists them with their
one-line doc. A plug-in declares its metadata as class attributes::

    @register("judge")
    class SubstringJudge(Judge):
        name = "substring"
        doc = "refusal-phrase judge, measured against XSTest human labels"
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from .errors import UserError

T = TypeVar("T")

_REGISTRY: dict[str, dict[str, type]] = {}


def register(kind: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: register ``cls`` under ``kind`` by its ``name`` attribute."""

    def deco(cls: type[T]) -> type[T]:
        name = getattr(cls, "name", None)
        if not name:
            raise TypeError(f"{cls.__name__} needs a class attribute `name` to be registered")
        _REGISTRY.setdefault(kind, {})[name] = cls
        return cls

    return deco


def _load_builtins() -> None:
    # importing these modules runs their @register decorators
    from . import judges  # noqa: F401
    from .interventions import families  # noqa: F401
    from .construct import recipes  # noqa: F401


def get(kind: str, name: str) -> type:
    _load_builtins()
    table = _REGISTRY.get(kind, {})
    if name not in table:
        known = ", ".join(sorted(table)) or "none"
        raise UserError(f"unknown {kind} '{name}' (known: {known})")
    return table[name]


def create(kind: str, name: str, **kwargs: Any) -> Any:
    return get(kind, name)(**kwargs)


def available(kind: str) -> dict[str, type]:
    _load_builtins()
    return dict(sorted(_REGISTRY.get(kind, {}).items()))
