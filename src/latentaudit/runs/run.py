"""A run folder::

    runs/<time>-<model>/
        config.json      the resolved configuration (+ its hash)
        store.sqlite     per-unit results, committed as soon as known
        summary.json     metrics with provenance (rebuilt from the store)

Without ``--output-dir`` a new folder ``runs/<time>-<model>`` is made — unless an earlier folder
under ``runs/`` holds the same resolved configuration, which is then resumed: rerunning the same
command after an interruption continues it, and rerunning a finished one recomputes nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..files import write_json
from .store import ResultStore

RUNS_ROOT = Path("runs")


def config_hash(config: dict[str, Any]) -> str:
    relevant = {k: v for k, v in config.items() if k not in ("output_dir", "progress")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return s[-48:] or "model"


class Run:
    def __init__(self, directory: Path, config: dict[str, Any], resumed: bool):
        self.dir = directory
        self.config = config
        self.config_hash = config_hash(config)
        self.resumed = resumed
        self.store = ResultStore(directory / "store.sqlite")

    @property
    def summary_path(self) -> Path:
        return self.dir / "summary.json"

    def write_json(self, name: str, obj: Any) -> Path:
        path = self.dir / name
        return write_json(path, obj)

    def close(self) -> None:
        self.store.close()


def _find_resumable(root: Path, chash: str, model_slug: str) -> Path | None:
    if not root.is_dir():
        return None
    found = []
    for d in root.glob(f"*-{model_slug}"):
        cfg = d / "config.json"
        try:
            if json.loads(cfg.read_text()).get("config_hash") == chash:
                found.append(d)
        except (OSError, ValueError):
            continue
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def open_run(output_dir: str | None, config: dict[str, Any], model_spec: str,
             root: Path | None = None) -> Run:
    root = root or RUNS_ROOT
    chash = config_hash(config)
    mslug = slug(model_spec.replace(":", "-").replace("/", "-"))
    resumed = False
    if output_dir:
        directory = Path(output_dir)
        if directory.exists() and not directory.is_dir():
            raise UserError(f"--output-dir {output_dir} exists and is not a directory")
        resumed = (directory / "store.sqlite").exists()
    else:
        found = _find_resumable(root, chash, mslug)
        if found is not None:
            directory, resumed = found, True
        else:
            directory = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{mslug}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create run folder {directory}: {e.strerror}") from None
    run = Run(directory, config, resumed)
    run.write_json("config.json", {"config_hash": chash, "config": config})
    return run
