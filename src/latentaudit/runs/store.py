"""The per-unit results store: one SQLite file per run folder.

Every unit of work (model, stage, set, prompt, layer, budget...) has a stable string key; its
result is committed as soon as it is known. A rerun looks keys up and skips what is done, so a
killed run resumes where it stopped and nothing is computed or stored twice (keys are primary
keys: a repeated write replaces, never duplicates).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import UserError
from ..files import DiskFault

# SQLite's primary result codes (``sqlite3.Error.sqlite_errorcode & 0xff``, Python >= 3.11)
_FULL, _IOERR = 13, 10
_CAPACITY_WORDS = ("disk is full", "disk i/o error")


def store_error(path: Path, e: sqlite3.Error, what: str = "write") -> UserError:
    """The one-line error for a failed SQLite call on the store at ``path``: a
    :class:`DiskFault` (exit 1) when the disk failed (full, I/O error), else a
    :class:`UserError` (exit 2: a folder that cannot be written, a file that is not a store)."""
    code = getattr(e, "sqlite_errorcode", None)
    text = " ".join(str(e).split())
    full = ((code & 0xFF) in (_FULL, _IOERR)) if code is not None else \
        any(w in text.lower() for w in _CAPACITY_WORDS)
    if full:
        return DiskFault(f"cannot {what} the run store {path}: {text}; every result committed "
                         "before is kept and none is half-written: free space and rerun the "
                         "same command to resume")
    return UserError(f"cannot {what} the run store {path}: {text}")


class ResultStore:
    """``ResultStore(path)`` opens (or creates) a run's store for writing;
    ``ResultStore(path, read_only=True)`` reads an existing one and never creates, migrates or
    writes it (the report's way in)."""

    def __init__(self, path: str | Path, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        self._tmp: str | None = None
        if read_only:
            self._con = self._connect_read_only()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._con = None  # type: ignore[assignment]
        try:
            self._con = sqlite3.connect(str(self.path), timeout=30)
            self._con.execute("PRAGMA journal_mode=WAL")
            self._con.execute("PRAGMA synchronous=NORMAL")
            self._con.execute(
                "CREATE TABLE IF NOT EXISTS results ("
                " key TEXT PRIMARY KEY, stage TEXT NOT NULL, payload TEXT NOT NULL,"
                " created REAL NOT NULL)"
            )
            self._con.execute("CREATE INDEX IF NOT EXISTS results_stage ON results(stage)")
            self._con.commit()
        except sqlite3.Error as e:  # a read-only folder, a file that is not SQLite, a full disk
            self.close()
            raise store_error(self.path, e, "open") from None

    def _connect_read_only(self) -> sqlite3.Connection:
        # No -wal file: every committed row is in the main file; read it as immutable (creates
        # no -shm/-wal files in the run folder). A -wal file: a writer is active or did not
        # checkpoint; read-only WAL access then needs (and finds) the sidecar files.
        path = self.path
        if not path.is_file():
            raise UserError(f"cannot read {path}: no such file")
        wal = path.with_name(path.name + "-wal").exists()
        mode = "mode=ro" if wal else "mode=ro&immutable=1"
        try:
            con = sqlite3.connect(f"{path.resolve().as_uri()}?{mode}", uri=True, timeout=10)
            con.execute("SELECT 1 FROM results LIMIT 1").fetchall()
            return con
        except sqlite3.Error:
            pass
        # e.g. a WAL database on a read-only medium without its -shm file: read a copy
        self._tmp = tempfile.mkdtemp(prefix="latentaudit-store-")
        for suffix in ("", "-wal"):
            src = path.with_name(path.name + suffix)
            if src.exists():
                shutil.copy2(src, Path(self._tmp) / (path.name + suffix))
        try:
            con = sqlite3.connect(str(Path(self._tmp) / path.name), timeout=10)
            con.execute("SELECT 1 FROM results LIMIT 1").fetchall()
            return con
        except sqlite3.Error as e:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise UserError(f"cannot read {path}: {e}") from None

    def close(self) -> None:
        if self._con is not None:
            # closing checkpoints the WAL; if the disk fails then, the WAL keeps every commit
            # and the next open recovers it, so the error that ended the run is the one reported
            with contextlib.suppress(sqlite3.Error):
                self._con.close()
            self._con = None  # type: ignore[assignment]
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get(self, key: str) -> dict | None:
        row = self._con.execute("SELECT payload FROM results WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def has(self, key: str) -> bool:
        return self._con.execute("SELECT 1 FROM results WHERE key=?", (key,)).fetchone() is not None

    def keys_with_prefix(self, prefix: str) -> set[str]:
        rows = self._con.execute(
            "SELECT key FROM results WHERE key >= ? AND key < ?", (prefix, prefix + "\uffff")
        )
        return {r[0] for r in rows}

    def put(self, key: str, stage: str, payload: dict[str, Any]) -> None:
        self.put_many([(key, stage, payload)])

    def put_many(self, items: Iterable[tuple[str, str, dict[str, Any]]]) -> None:
        now = time.time()
        rows = [(k, s, json.dumps(p, ensure_ascii=False, sort_keys=True), now) for k, s, p in items]
        # one transaction: all of the batch or none of it (a crash before the commit leaves
        # no row of it; a disk fault rolls it back)
        try:
            self._con.executemany(
                "INSERT OR REPLACE INTO results(key, stage, payload, created) VALUES (?,?,?,?)", rows
            )
            self._con.commit()
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                self._con.rollback()
            raise store_error(self.path, e) from None

    def items(self, prefix: str = "") -> Iterator[tuple[str, dict]]:
        rows = self._con.execute(
            "SELECT key, payload FROM results WHERE key >= ? AND key < ? ORDER BY key",
            (prefix, prefix + "\uffff"),
        )
        for k, p in rows:
            yield k, json.loads(p)

    def records(self, contains: str | None = None) -> list[tuple[str, str, dict]]:
        """Every (key, stage, payload), or those whose key contains ``contains`` (an executor
        ships one model's records to a worker)."""
        sql, args = "SELECT key, stage, payload FROM results", ()
        if contains is not None:
            sql, args = sql + " WHERE instr(key, ?) > 0", (contains,)
        return [(k, s, json.loads(p)) for k, s, p in self._con.execute(sql + " ORDER BY key", args)]

    def any(self, prefix: str, payload_like: str | None = None) -> bool:
        """Whether a key starts with ``prefix`` (and its payload matches the SQL LIKE pattern)."""
        sql = "SELECT 1 FROM results WHERE key >= ? AND key < ?"
        args: list[Any] = [prefix, prefix + "\uffff"]
        if payload_like is not None:
            sql += " AND payload LIKE ?"
            args.append(payload_like)
        return self._con.execute(sql + " LIMIT 1", args).fetchone() is not None

    def count(self, prefix: str = "") -> int:
        return self._con.execute(
            "SELECT COUNT(*) FROM results WHERE key >= ? AND key < ?", (prefix, prefix + "\uffff")
        ).fetchone()[0]
