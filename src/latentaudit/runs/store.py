"""The per-unit results store: one SQLite file per run folder.

Every unit of work (model, stage, set, prompt, layer, budget...) has a stable string key; its
result is committed as soon as it is known. A rerun looks keys up and skips what is done, so a
killed run resumes where it stopped and nothing is computed or stored twice (keys are primary
keys: a repeated write replaces, never duplicates).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Iterator


class ResultStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
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

    def close(self) -> None:
        self._con.close()

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
        with self._con:  # one transaction: all of the batch or none of it
            self._con.executemany(
                "INSERT OR REPLACE INTO results(key, stage, payload, created) VALUES (?,?,?,?)", rows
            )

    def items(self, prefix: str = "") -> Iterator[tuple[str, dict]]:
        rows = self._con.execute(
            "SELECT key, payload FROM results WHERE key >= ? AND key < ? ORDER BY key",
            (prefix, prefix + "\uffff"),
        )
        for k, p in rows:
            yield k, json.loads(p)

    def count(self, prefix: str = "") -> int:
        return self._con.execute(
            "SELECT COUNT(*) FROM results WHERE key >= ? AND key < ?", (prefix, prefix + "\uffff")
        ).fetchone()[0]
