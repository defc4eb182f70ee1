"""The run configuration: one pydantic model is the single source of truth.

A YAML file (``--config run.yaml``) and command-line flags fill the same model; any flag given
overrides the file. Unknown keys and bad types are rejected with one line naming the field.
The resolved configuration is written into every run folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from .errors import UserError
from .files import nesting_depth
from .judges.compose import JudgeConfig
from .models.embedded import DEFAULT_MODEL


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Strict):
    model: str = Field(DEFAULT_MODEL, description="model: embedded:NAME (latentaudit ls models), "
                       "tiny:FAMILY, a checkpoint folder, a .gguf file or a hub id "
                       "(owner/name[@revision])")
    limit: int | None = Field(None, gt=0, description="use at most N prompts per set (evenly "
                              "spaced, deterministic)")
    seed: int = Field(0, description="random seed")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N, mps, or sharded "
                        "(device_map=auto over GPUs)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights' dtype (auto: bfloat16 on a CUDA device that has it, "
        "float32 elsewhere; the resolved one is the run's)", validate_default=True)
    output_dir: str | None = Field(None, description="run folder (default: runs/<time>-<model>, "
                                   "or the earlier folder of the same config, resumed)")
    data_dir: str | None = Field(None, description="folder with local copies of the standard "
                                 "sets (layout of shared/data); otherwise they load from the hub")
    trust_remote_code: bool = Field(False, description="allow a model's own code (auto_map, .py "
                                    "files in its folder or hub repository)")
    allow_pickle: bool = Field(False, description="load pickle weights (.bin, .pt, .pth, .ckpt) "
                               "of a model without safetensors: unpickling can run arbitrary code")
    batch_size: int = Field(32, gt=0, description="prompts per generation batch")
    progress: Literal["auto", "rich", "plain", "none"] = Field("auto", description="progress display")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="the judge of every "
                               "stage: a spec, or {name, fallback, ensemble, rule, device, url, ...}")
    behave: "BehaveConfig" = Field(default_factory=lambda: _behave_config())
    latent: "LatentConfig" = Field(default_factory=lambda: _latent_config())
    tamper: "TamperConfig" = Field(default_factory=lambda: _tamper_config())

    @field_validator("dtype")
    @classmethod
    def _dtype_resolved(cls, v: str, info: ValidationInfo) -> str:
        """``auto`` is resolved here, so the run's identity names the dtype it ran in (a CPU
        run's stays float32, as before ``auto`` existed)."""
        if v != "auto":
            return v
        from .models.device import auto_dtype

        return auto_dtype(str(info.data.get("device") or "auto"))

    @model_validator(mode="before")
    @classmethod
    def _judge_moved(cls, data: Any) -> Any:
        """``behave.judge`` (where the judge lived before it served every stage) still works."""
        if isinstance(data, dict) and isinstance(data.get("behave"), dict) and "judge" in data["behave"]:
            behave = dict(data["behave"])
            old = behave.pop("judge")
            data = {**data, "behave": behave}
            data.setdefault("judge", old)
        return data


class ModelEntry(_Strict):
    name: str = Field(min_length=1, description="label shown in tables and the report")
    spec: str = Field(min_length=1, description="model spec, as --model takes it")


AuditStage = Literal["behave", "directions", "latent", "tamper", "tamper_control"]


class ExecutorConfig(_Strict):
    """Where the units of ``latentaudit run`` execute. ``local``: one process, models in turn.
    ``ray``: independent units — (model, behave), (model, tamper), (model, latent family, prompt
    chunk) — on Ray actors that keep their model loaded; the driver alone writes the run folder.
    Not part of the run's identity: a run started on one executor resumes on the other."""

    kind: Literal["local", "ray"] = Field("local", description="local (one process) or ray")
    address: str | None = Field(None, description="Ray cluster: auto, HOST:PORT or ray://HOST:PORT "
                                "[default: a local cluster started for this run]")
    workers: int | None = Field(None, gt=0, description="Ray actors [default: one per GPU of the "
                                "cluster, else 2]")
    gpus_per_worker: float | None = Field(None, ge=0, description="GPUs per actor [default: 1 "
                                          "when the cluster has GPUs, else 0]")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per actor")
    chunk: int = Field(16, gt=0, description="harmful prompts per latent unit (each unit sweeps "
                       "every layer of its family, deepest first, keeping the warm starts)")
    retries: int = Field(2, ge=0, description="times a unit whose worker died is run again")


class AuditConfig(RunConfig):
    """``latentaudit run --config audit.yaml``: the settings of RunConfig (applied to every model)
    plus the models and the stages. ``models`` entries are specs or {name, spec} mappings; without
    ``models`` the single ``model`` is audited."""

    models: list[ModelEntry | str] | None = Field(None, min_length=1)
    stages: list[AuditStage] = Field(default_factory=lambda: ["behave", "latent", "tamper"],
                                     min_length=1)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig, description="where the "
                                     "units run: {kind: local|ray, address, workers, chunk, ...}")


def audit_entries(acfg: AuditConfig) -> list[ModelEntry]:
    from .errors import UserError
    from .runs.run import slug

    raw = acfg.models or [acfg.model]
    out = [m if isinstance(m, ModelEntry) else ModelEntry(name=slug(m.replace(":", "-").replace("/", "-")), spec=m)
           for m in raw]
    names = [m.name for m in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"config: models: duplicate name(s) {', '.join(dup)}")
    if "tamper_control" in acfg.stages and "tamper" not in acfg.stages:
        raise UserError("config: stages: tamper_control needs tamper")
    return out


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def format_validation_error(e: ValidationError, where: str = "config") -> str:
    parts = []
    for err in e.errors()[:3]:
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{loc}: {msg}")
    more = f" (+{len(e.errors()) - 3} more)" if len(e.errors()) > 3 else ""
    return f"{where}: " + "; ".join(parts) + more


class _ConfigProblem(Exception):
    """A config YAML that parses but must be refused: (line, message)."""


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases and repeated keys. A run config never needs an alias,
    and refusing them outright stops a "billion laughs" document (a few lines whose aliases
    expand to billions of nodes) before anything walks it; PyYAML keeps the last of repeated
    keys silently, which would drop a setting the user wrote."""

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            ev = self.peek_event()
            raise _ConfigProblem(ev.start_mark.line + 1, f"an alias (*{ev.anchor}): aliases "
                                 "are not allowed in a config, write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                dup = key in seen
            except TypeError:  # an unhashable key: the base constructor reports it
                continue
            if dup:
                raise _ConfigProblem(key_node.start_mark.line + 1, f"key {key!r} appears twice "
                                     "in one mapping (YAML would keep only the last)")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


MAX_CONFIG_DEPTH = 20  # a run config nests three levels or so; deeper is not a config


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file ({} for an empty one). Bad input is one
    UserError naming the file and line: a missing or unreadable file, bytes that are not
    UTF-8, invalid YAML (a tab in the indentation is named), a repeated key, an alias, nesting
    deeper than MAX_CONFIG_DEPTH, or a top level that is not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read config {path}: {e.strerror or type(e).__name__}") from None
    skip = 3 if raw.startswith(b"\xef\xbb\xbf") else 0  # a UTF-8 BOM is dropped
    try:
        text = raw[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = e.start + skip
        line = raw.count(b"\n", 0, at) + 1
        raise UserError(f"config {path} line {line}: not UTF-8 text (byte {at})") from None
    try:
        data = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader subclass)
    except _ConfigProblem as e:
        raise UserError(f"config {path} line {e.args[0]}: {e.args[1]}") from None
    except RecursionError:
        raise UserError(f"config {path}: nested deeper than {MAX_CONFIG_DEPTH} levels") from None
    except yaml.reader.ReaderError as e:  # a control character; its position, not a mark
        line = text.count("\n", 0, e.position) + 1
        raise UserError(f"config {path} line {line}: invalid YAML (character "
                        f"U+{e.character:04X} is not allowed)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        lines = text.split("\n")
        bad_line = lines[mark.line] if mark and mark.line < len(lines) else ""
        why = getattr(e, "problem", None) or ""
        if why.startswith("but ") and getattr(e, "context", None):  # "expected X, but found Y"
            why = f"{e.context}, {why}"
        if "\t" in bad_line[: len(bad_line) - len(bad_line.lstrip())] or "'\\t'" in why:
            why = "a tab character: YAML indents with spaces"
        raise UserError(f"config {path}{where}: invalid YAML" + (f" ({why})" if why else "")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config {path}: expected a mapping (key: value lines) at the top level, "
                        f"got {type(data).__name__}")
    if nesting_depth(data, MAX_CONFIG_DEPTH) > MAX_CONFIG_DEPTH:
        raise UserError(f"config {path}: nested deeper than {MAX_CONFIG_DEPTH} levels")
    return data


def resolve_config(config_path: str | None, overrides: dict[str, Any], cls=RunConfig) -> RunConfig:
    """File values, then flag overrides (dotted keys like ``behave.max_new_tokens`` allowed)."""
    data = read_config_file(config_path) if config_path else {}
    if isinstance(data.get("judge"), str):  # `judge: SPEC` and a --judge-* flag merge
        data["judge"] = {"name": data["judge"]}
    nested: dict[str, Any] = {}
    for k, v in overrides.items():
        if v is None:
            continue
        cur = nested
        *heads, last = k.split(".")
        for h in heads:
            cur = cur.setdefault(h, {})
        cur[last] = v
    try:
        return cls.model_validate(_deep_merge(data, nested))
    except ValidationError as e:
        raise UserError(format_validation_error(e, f"config {config_path}" if config_path else "options")) from None


def _behave_config():
    from .stages.behave import BehaveConfig

    return BehaveConfig()


def _latent_config():
    from .stages.latent import LatentConfig

    return LatentConfig()


def _tamper_config():
    from .stages.tamper import TamperConfig

    return TamperConfig()


from .stages.behave import BehaveConfig  # noqa: E402  (each stage owns its section)
from .stages.latent import LatentConfig  # noqa: E402
from .stages.tamper import TamperConfig  # noqa: E402

RunConfig.model_rebuild()
AuditConfig.model_rebuild()
