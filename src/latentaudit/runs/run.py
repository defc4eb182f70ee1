"""A run folder::

    runs/<time>-<model>/
        config.json      the resolved configuration (+ its hash)
        store.sqlite     per-unit results, committed as soon as known
        summary.json     metrics with provenance (rebuilt from the store)
        .lock            who writes into the folder now (pid, host, command, start time)

Without ``--output-dir`` a new folder ``runs/<time>-<model>`` is made — unless an earlier folder
under ``runs/`` holds the same resolved configuration, which is then resumed: rerunning the same
command after an interruption continues it, and rerunning a finished one recomputes nothing.

One command writes into a run folder at a time: :func:`open_run` takes an exclusive
``flock`` on ``.lock`` and holds it until :meth:`Run.close`. The kernel drops it when the
process ends, however it ends, so a killed run never leaves a stale lock; a second writer is
refused with one line naming the holder. Readers (``report``, ``compare``) take no lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import IO, Any

from ..errors import UserError
from ..files import os_error, write_json
from .store import ResultStore

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows (not a target): run folders go unguarded
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"

RUNS_ROOT = Path("runs")


def config_hash(config: dict[str, Any]) -> str:
    relevant = {k: v for k, v in config.items() if k not in ("output_dir", "progress")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return s[-48:] or "model"


def _holder(path: Path) -> str:
    """Who holds the lock file at ``path``, in words (from what the holder wrote into it)."""
    try:
        h = json.loads(path.read_text(encoding="utf-8"))
        cmd = str(h.get("command", "?"))
        cmd = cmd if len(cmd) <= 160 else cmd[:157] + "..."
        return f"pid {h['pid']} on host {h['host']} since {h['started']} ({cmd})"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "a process that has not yet recorded itself"


def _busy(directory: Path) -> UserError:
    return UserError(f"run folder {directory} is in use by another command: "
                     f"{_holder(directory / LOCK_NAME)}; wait for it to end, or write into "
                     "another --output-dir")


class FolderLock:
    """The exclusive right to write into one run folder: an ``flock`` on ``<dir>/.lock`` held
    by an open file for as long as this object is open (the kernel releases it when the
    process dies). The file stays; only the lock on it means anything."""

    def __init__(self, directory: Path, command: str | None = None):
        self.path = directory / LOCK_NAME
        self.command = command or shlex.join([Path(sys.argv[0]).name or "python"] + sys.argv[1:])
        self._file: IO[str] | None = None

    def acquire(self) -> "FolderLock":
        """Takes the lock; returns self. Another holder: one line of :class:`UserError`."""
        try:
            # opened without truncation: the holder's record must survive a refused open
            f = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), "r+",
                          encoding="utf-8")
        except OSError as e:
            raise os_error(self.path.parent, e, "write into the run folder") from None
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                raise _busy(self.path.parent) from None
            except OSError as e:  # a file system without flock (some network mounts)
                warnings.warn(f"cannot lock {self.path} ({e.strerror}): a second command "
                              "writing into this run folder would not be refused")
        try:
            f.truncate(0)
            f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                "command": self.command,
                                "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}) + "\n")
            f.flush()
        except OSError as e:
            f.close()
            raise os_error(self.path, e) from None
        self._file = f
        return self

    def release(self) -> None:
        """Gives the folder up (idempotent); closing the file drops the ``flock``."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None


def check_free(directory: Path) -> None:
    """Raises the one-line :class:`UserError` of :func:`open_run` if another command holds
    ``directory`` now (a shared lock probe: takes nothing, writes nothing), so a busy folder is
    refused before a model loads. Returns None."""
    path = directory / LOCK_NAME
    if fcntl is None or not path.is_file():
        return
    try:
        with open(path, encoding="utf-8") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _busy(directory) from None
    except OSError:
        return  # unreadable lock file: open_run gives the precise error


class Run:
    def __init__(self, directory: Path, config: dict[str, Any], resumed: bool,
                 lock: FolderLock | None = None):
        self.dir = directory
        self.config = config
        self.config_hash = config_hash(config)
        self.resumed = resumed
        self.lock = lock
        self.store = ResultStore(directory / "store.sqlite")

    @property
    def summary_path(self) -> Path:
        return self.dir / "summary.json"

    def write_json(self, name: str, obj: Any) -> Path:
        path = self.dir / name
        return write_json(path, obj)

    def close(self) -> None:
        """Closes the store, then gives the folder up (idempotent)."""
        self.store.close()
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


def _resolve(output_dir: str | None, config: dict[str, Any], model_spec: str,
             root: Path) -> Path | None:
    """The folder :func:`open_run` writes into: ``output_dir``, else the newest resumable one
    under ``root``; None when a new folder is to be made."""
    if output_dir:
        directory = Path(output_dir)
        if directory.exists() and not directory.is_dir():
            raise UserError(f"--output-dir {output_dir} exists and is not a directory")
        return directory
    mslug = slug(model_spec.replace(":", "-").replace("/", "-"))
    return _find_resumable(root, config_hash(config), mslug)


def run_folder(output_dir: str | None, config: dict[str, Any], model_spec: str) -> Path | None:
    """The folder a command would write into (``output_dir``, else the newest resumable one);
    None when it would make a new one."""
    return _resolve(output_dir, config, model_spec, RUNS_ROOT)


def check_run_folder(output_dir: str | None, config: dict[str, Any], model_spec: str,
                     root: Path | None = None) -> None:
    """What :func:`open_run` would refuse, checked before a model loads: a folder another
    command writes into now. Returns None; raises :class:`UserError`."""
    directory = _resolve(output_dir, config, model_spec, root or RUNS_ROOT)
    if directory is not None:
        check_free(directory)


def _new_folder(root: Path, mslug: str) -> Path:
    """A fresh ``root/<time>-<model>`` folder, made; two commands started in the same second
    get two folders (``<time>-2-<model>``...: still ending in the model, as a rerun looks for
    it), not one."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    for i in range(1, 1000):
        directory = root / (f"{stamp}-{mslug}" if i == 1 else f"{stamp}-{i}-{mslug}")
        try:
            directory.mkdir()
            return directory
        except FileExistsError:
            continue
    raise UserError(f"cannot create a run folder under {root}: too many named {stamp}-*")


def _remove_stale_temporaries(directory: Path) -> None:
    """A killed writer may leave ``.summary.json.tmp-<pid>`` behind (never under the real
    name); under the lock no writer of these files is alive, so they go."""
    for name in ("summary.json", "config.json"):
        for tmp in directory.glob(f".{name}.tmp-*"):
            with contextlib.suppress(OSError):
                tmp.unlink()


def open_run(output_dir: str | None, config: dict[str, Any], model_spec: str,
             root: Path | None = None, command: str | None = None) -> Run:
    """The run folder of a command, open for writing and locked against a second writer until
    :meth:`Run.close` (``command``: what the lock records, for the refusal message). Returns
    the :class:`Run`; a folder another command holds, or one that cannot be written, is one
    line of :class:`UserError` and leaves nothing behind."""
    root = root or RUNS_ROOT
    chash = config_hash(config)
    directory = _resolve(output_dir, config, model_spec, root)
    made = False
    try:
        if directory is None:
            directory = _new_folder(root, slug(model_spec.replace(":", "-").replace("/", "-")))
            made = True
        elif not directory.exists():
            directory.mkdir(parents=True)
            made = True
    except OSError as e:
        raise os_error(directory or root, e, "create run folder") from None
    lock = FolderLock(directory, command)
    try:
        lock.acquire()
        _remove_stale_temporaries(directory)
        resumed = (directory / "store.sqlite").exists()
        run = Run(directory, config, resumed, lock)
        try:
            run.write_json("config.json", {"config_hash": chash, "config": config})
        except BaseException:
            run.close()
            raise
    except BaseException:
        lock.release()
        if made:  # a folder this call made and could not use: not left half-made
            shutil.rmtree(directory, ignore_errors=True)
        raise
    return run
