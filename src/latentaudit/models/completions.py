"""A model's greedy completions to a prompt set, generated once and cached on disk.

A cache file is JSONL under ``cache_root()``, one row per prompt, appended and fsynced as each
generation batch finishes: an interrupted build keeps what it generated, and a torn last line is
ignored on reading (its prompt is generated again). The zoo (retain answers, harmful
completions) and the tamper stage (attack pairs) share this code. Their two families of files
keep the names and rows they had, so that caches written before stay valid:

* ``answers/<key>.jsonl``: rows ``{"id", "response"}``, each batch in generation order;
* ``tamper-pairs/<kind>-<key>.jsonl``: rows ``{"id", "prompt", "completion", "n_new_tokens"}``,
  each batch in prompt order, non-ASCII unescaped.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..data.sets import Prompt, PromptSet
from .embedded import cache_root
from .fingerprint import fingerprint
from .generate import Generation, greedy_generate


@dataclass(frozen=True)
class Layout:
    """How one family of cache files writes a row."""

    row: Callable[[Prompt, Generation], dict]
    fields: tuple[str, ...]  # a row without one of them is ignored on reading
    ensure_ascii: bool
    prompt_order: bool  # each batch's rows in prompt order, else in generation order


ANSWERS = Layout(lambda p, g: {"id": p.id, "response": g.response}, ("id", "response"),
                 ensure_ascii=True, prompt_order=False)
PAIRS = Layout(lambda p, g: {"id": p.id, "prompt": p.text, "completion": g.response,
                             "n_new_tokens": g.n_new_tokens},
               ("id", "completion", "n_new_tokens"), ensure_ascii=False, prompt_order=True)


class CompletionCache:
    """One cache file: ``rows`` (prompt id → row) holds what it has, :meth:`generate` adds the
    missing rows."""

    def __init__(self, path: Path, layout: Layout):
        self.path, self.layout = path, layout
        self.rows = self._read()

    def _read(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        if not self.path.is_file():
            return out
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                if all(k in row for k in self.layout.fields):
                    out[str(row["id"])] = row
            except (ValueError, TypeError):
                continue  # a line cut by an interrupted write: generated again
        return out

    def missing(self, prompts: list[Prompt]) -> list[Prompt]:
        return [p for p in prompts if p.id not in self.rows]

    def generate(self, lm, prompts: list[Prompt], max_new_tokens: int, batch_size: int,
                 system: str | None = None) -> int:
        """Greedy-decode the prompts not cached (one call, so batching is that of the list
        given), committing each batch; returns how many were generated."""
        todo = self.missing(prompts)
        if not todo:
            return 0

        def commit(idx: list[int], gens: list[Generation]) -> None:
            done = sorted(zip(idx, gens), key=lambda x: x[0]) if self.layout.prompt_order \
                else list(zip(idx, gens))
            rows = [self.layout.row(todo[i], g) for i, g in done]
            self._append(rows)
            self.rows.update((r["id"], r) for r in rows)

        greedy_generate(lm, [p.text for p in todo], max_new_tokens, batch_size, system,
                        on_batch=commit)
        return len(todo)

    def _append(self, rows: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps(r, ensure_ascii=self.layout.ensure_ascii) + "\n" for r in rows)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def answers_cache(lm, ps: PromptSet, max_new_tokens: int,
                  system: str | None = None) -> CompletionCache:
    """The zoo's cache of ``lm``'s answers to ``ps``."""
    # a tiny model has no fingerprint: its spec stands in
    fp = fingerprint(lm) or lm.info.get("spec")
    key = hashlib.sha256(f"{fp}|{ps.sha256}|{max_new_tokens}|{system}".encode()).hexdigest()[:16]
    return CompletionCache(cache_root() / "answers" / f"{key}.jsonl", ANSWERS)


def pairs_cache(fp: str, ps: PromptSet, completion_tokens: int, kind: str,
                version: str) -> CompletionCache:
    """The tamper stage's cache of the data model's (fingerprint ``fp``) completions to ``ps``;
    ``kind`` is the control (harmful or benign), ``version`` the stage's."""
    blob = json.dumps({"fp": fp, "set": ps.sha256, "tokens": completion_tokens,
                       "system": None, "kind": kind, "v": version}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return CompletionCache(cache_root() / "tamper-pairs" / f"{kind}-{key}.jsonl", PAIRS)


def cached_answers(lm, ps: PromptSet, max_new_tokens: int, batch_size: int = 16,
                   system: str | None = None) -> dict[str, str]:
    """prompt id → ``lm``'s greedy answer to it, generated once and cached (keyed by the model's
    fingerprint, the prompt set's sha256, the token count and the system prompt)."""
    cache = answers_cache(lm, ps, max_new_tokens, system)
    cache.generate(lm, ps.prompts, max_new_tokens, batch_size, system)
    return {p.id: cache.rows[p.id]["response"] for p in ps.prompts}
