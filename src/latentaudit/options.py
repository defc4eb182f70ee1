"""Command-line options made from the configuration's pydantic fields: each option is declared
once, as a field (type, default, description), and a verb names the fields it offers as flags.

``--set section.key=VALUE`` (repeatable, the value read as YAML) reaches every field, the ones
without a flag of their own included; a flag and ``--set`` override ``--config``'s file.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

import typer
import yaml
from pydantic import BaseModel

from .errors import UserError


def field_of(model: type[BaseModel], path: str):
    """(FieldInfo, annotation) of the dotted ``path`` inside ``model``."""
    *heads, last = path.split(".")
    for h in heads:
        model = _model_type(model.model_fields[h].annotation)
    f = model.model_fields[last]
    return f, f.annotation


def _model_type(ann) -> type[BaseModel]:
    for a in (ann, *typing.get_args(ann)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    raise TypeError(f"{ann} is not a model")


def _flag_type(ann) -> tuple[type, str]:
    """(the option's Python type, a note for the help) of a field annotation: scalars as
    themselves, Literal as str with its choices, lists as comma-separated text."""
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _flag_type(args[0])
    if origin is Literal:
        return str, "one of " + ", ".join(map(str, typing.get_args(ann)))
    if origin is list:
        return list[str], "comma-separated or repeated"
    if ann in (int, float, str, bool):
        return ann, ""
    return str, ""


def _default_text(f) -> str:
    if f.default_factory is not None:
        d = f.default_factory()
        return ",".join(map(str, d)) if isinstance(d, list) else str(d)
    if f.default is None:
        return ""
    return str(f.default).lower() if isinstance(f.default, bool) else str(f.default)


def option(model: type[BaseModel], path: str, flag: str | None = None, *short: str
           ) -> tuple[str, inspect.Parameter]:
    """A typer parameter for the field ``path`` of ``model``: (parameter name, parameter)."""
    f, ann = field_of(model, path)
    typ, note = _flag_type(ann)
    name = path.rsplit(".", 1)[-1]
    flag = flag or "--" + name.replace("_", "-")
    pname = path.replace(".", "__")  # unique within a verb: tamper.batch_size beside batch_size
    desc = (f.description or name.replace("_", " ")).rstrip(".")
    shown = _default_text(f)
    help_ = desc + (f" ({note})" if note else "") + (f" [default: {shown}]" if shown else "")
    decls = [flag, *short]
    if typ is bool:
        decls = [f"{flag}/--no-{flag[2:]}", *short]
    ptype = Annotated[Optional[typ], typer.Option(*decls, help=help_, show_default=False)]
    return pname, inspect.Parameter(pname, inspect.Parameter.KEYWORD_ONLY, default=None,
                                    annotation=ptype)


def annotated(model: type[BaseModel], path: str, flag: str | None = None, *short: str):
    """The ``Annotated`` option type of a field, for a verb whose signature is written out."""
    return option(model, path, flag, *short)[1].annotation


SET_PARAM = inspect.Parameter(
    "set_", inspect.Parameter.KEYWORD_ONLY, default=None,
    annotation=Annotated[Optional[list[str]], typer.Option(
        "--set", metavar="KEY=VALUE", show_default=False,
        help="any configuration value by its dotted key, e.g. latent.family_params.pgd.steps=30 "
        "(repeatable; the value is read as YAML)")])
CONFIG_PARAM = inspect.Parameter(
    "config", inspect.Parameter.KEYWORD_ONLY, default=None,
    annotation=Annotated[Optional[Path], typer.Option("--config", "-c", show_default=False,
                                                      help="YAML config; flags override it")])


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` items as {dotted key: value read as YAML}."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set takes KEY=VALUE (got {item!r})")
        try:
            out[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise UserError(f"--set {key}: cannot parse {raw!r}") from None
    return out


def config_verb(app: typer.Typer, name: str, model: type[BaseModel],
                flags: list[tuple[str, ...] | str], extra: list[inspect.Parameter] = ()):
    """Register ``body(cfg, **extra)`` as the verb ``name``: its flags are the fields ``flags``
    of ``model`` (a path, or (path, flag, short...)), plus ``--config`` and ``--set``; the body
    receives the resolved configuration."""
    def deco(body: Callable[..., None]) -> Callable[..., None]:
        params = [CONFIG_PARAM]
        paths: dict[str, str] = {}
        for spec in flags:
            path, *decl = (spec,) if isinstance(spec, str) else spec
            pname, param = option(model, path, *decl)
            paths[pname] = path
            params.append(param)
        params += [*extra, SET_PARAM]

        @functools.wraps(body)
        def command(**kw: Any) -> None:
            from .config import resolve_config

            over: dict[str, Any] = {}
            for pname, path in paths.items():
                v = kw.pop(pname)
                if isinstance(v, list):  # repeated, each comma-separated
                    v = [x.strip() for item in v for x in item.split(",") if x.strip()]
                if isinstance(v, Path):
                    v = str(v)
                over[path] = v
            over.update(parse_set(kw.pop("set_")))
            config = kw.pop("config")
            cfg = resolve_config(str(config) if config else None, over, cls=model)
            body(cfg, **kw)

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        del command.__wrapped__  # typer must read the signature above, not the body's
        app.command(name)(command)
        return body

    return deco
