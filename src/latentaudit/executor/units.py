"""Units of an audit that can run anywhere: what a worker is sent and what it sends back.

A unit is one model's behavioural stage, its fine-tuning attack, what its latent chunks share
(``latent_prep``), one latent family on one contiguous chunk of the harmful prompts, or its
summary. A worker runs the same code path as the local executor, on the model it keeps loaded,
into a scratch run folder seeded with the records the driver's store already holds for that
model, and returns only what is new — records and files (the refusal directions). The driver
alone writes the run folder.

Warm starts survive: a latent unit sweeps every layer of its family for its prompts, deepest
first, each layer's search starting from the ε* of the layer before, exactly as one process does
(each prompt's search is its own; a chunk only changes which prompts share a batch). The summary
unit replays the whole model from the store (nothing left to compute) and returns the model's
summary, so summary.json is the local executor's.
"""

from __future__ import annotations

import math
import shutil
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# files of a run folder that are not results a unit can produce
_NOT_SHIPPED = {"store.sqlite", "store.sqlite-wal", "store.sqlite-shm", "summary.json",
                "config.json", ".lock"}


@dataclass(frozen=True)
class Unit:
    model: int  # index into the audit's models
    name: str  # the model's label
    kind: str  # behave | tamper | latent_prep | latent | summary
    family: str | None = None
    chunk: tuple[int, int] | None = None  # (i, k): the i-th of k prompt chunks
    deps: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        out = f"{self.name}/{self.kind}"
        if self.family:
            out += f"/{self.family}"
        if self.chunk:
            out += f"/{self.chunk[0] + 1}of{self.chunk[1]}"
        return out

    def stages(self, stages: list[str]) -> list[str]:
        """The pipeline stages this unit runs, of the audit's ``stages``."""
        if self.kind == "summary":
            return list(stages)
        if self.kind == "tamper":
            return [s for s in stages if s in ("tamper", "tamper_control")]
        if self.kind == "latent_prep":
            # a directions-only audit needs no coherence guard
            return ([s for s in stages if s == "directions"]
                    + (["latent_prep"] if "latent" in stages else []))
        return [self.kind]


def plan(names: list[str], stages: list[str], n_harmful: list[int], families: list[str],
         chunk: int) -> list[Unit]:
    """Every unit of the audit, in an order that starts the long ones early. ``n_harmful``: the
    size of each model's latent prompt set (chunks of at most ``chunk`` prompts)."""
    units: list[Unit] = []
    for m, name in enumerate(names):
        mine: list[Unit] = []
        if "latent" in stages:
            prep = Unit(m, name, "latent_prep")
            mine.append(prep)
            k = max(1, math.ceil(n_harmful[m] / chunk))
            mine += [Unit(m, name, "latent", f, (i, k), (prep.id,))
                     for f in families for i in range(k)]
        elif "directions" in stages:
            mine.append(Unit(m, name, "latent_prep"))
        if "tamper" in stages:
            mine.append(Unit(m, name, "tamper"))
        if "behave" in stages:
            mine.append(Unit(m, name, "behave"))
        units += mine
        units.append(Unit(m, name, "summary", deps=tuple(u.id for u in mine)))
    return units


@dataclass
class Task:
    """What a worker is sent for one unit."""

    unit: Unit
    cfg: Any  # the model's RunConfig (latent families narrowed to the unit's)
    stages: list[str]
    command: str
    run_config: dict
    records: list[tuple[str, str, dict]]  # what the store already holds for this model
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Result:
    """What a worker sends back: only what the unit added."""

    unit_id: str
    model_key: str
    records: list[tuple[str, str, dict]]
    files: dict[str, bytes]
    summary: dict | None  # the model's ModelSummary (JSON data), from the summary unit
    wall_s: float
    worker: str = ""
    warnings: list[str] = field(default_factory=list)  # raised while it ran, once each


def task_config(cfg, unit: Unit):
    """The model's config for ``unit``: a latent unit runs its own family only."""
    if unit.kind == "latent" and unit.family:
        return cfg.model_copy(update={"latent": cfg.latent.model_copy(
            update={"families": [unit.family]})})
    return cfg


def run_task(task: Task, lm=None) -> Result:
    """Run one unit on this process (a Ray actor, or the driver itself) with the model ``lm``
    already loaded (None: load it), into a scratch folder; return what is new."""
    from ..pipeline import run_audit
    from ..runs.run import Run

    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="latentaudit-unit-"))
    try:
        for name, data in task.files.items():
            (tmp / name).write_bytes(data)
        run = Run(tmp, task.run_config, resumed=True)
        try:
            run.store.put_many(task.records)
            seeded = {k for k, _, _ in task.records}
            chunk = task.unit.chunk if task.unit.kind == "latent" else None
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _, summary = run_audit(task.cfg, task.unit.stages(task.stages), task.command,
                                       run=run, name=task.unit.name, lm=lm, chunk=chunk)
            new = [r for r in run.store.records() if r[0] not in seeded]
        finally:
            run.close()
        files = {p.name: p.read_bytes() for p in tmp.iterdir()
                 if p.is_file() and p.name not in _NOT_SHIPPED
                 and task.files.get(p.name) != p.read_bytes()}
        ms = summary.models[0]
        return Result(task.unit.id, ms.key, new, files,
                      ms.model_dump(mode="json") if task.unit.kind == "summary" else None,
                      round(time.time() - t0, 2), socket.gethostname(),
                      list(dict.fromkeys(str(w.message) for w in caught)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def records_for(store, model_key: str | None) -> list[tuple[str, str, dict]]:
    """The records of one model (every record while its key is not known yet)."""
    return store.records(None if model_key is None else f"/{model_key}")


def shipped_files(run_dir: Path) -> dict[str, bytes]:
    """The run folder's result files a worker may need (the refusal directions)."""
    return {p.name: p.read_bytes() for p in sorted(run_dir.glob("directions-*.safetensors"))}
