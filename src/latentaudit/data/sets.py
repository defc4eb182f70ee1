"""Prompt sets.

A prompt-set spec is one of:

- ``builtin:NAME[:SPLIT]`` — our own sets (``harmful``, ``harmless``, ``borderline``), each
  with a fixed ``train``/``test`` split; no split means every row;
- a standard-set alias (``advbench``, ``harmbench``, ``jailbreakbench``, ``xstest``,
  ``xstest-unsafe``, ``alpaca``): read from ``--data-dir`` when given (the layout of
  ``shared/data``), else from its Hugging Face hub id;
- a local ``.csv``, ``.json`` or ``.jsonl`` file (the prompt column chosen by ``prompt_col``,
  else the first of prompt/instruction/goal/question/text/behavior);
- ``hf:OWNER/NAME[:SPLIT]`` — any hub dataset (needs the ``hub`` extra and a network).

Every set carries a sha256 of its prompts so results record exactly what was asked.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import warnings
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..errors import UserError
from ..files import nesting_depth

PROMPT_COLUMNS = ("prompt", "instruction", "goal", "question", "text", "behavior", "Behavior")
TARGET_COLUMNS = ("target",)
BUILTIN = {
    "harmful": "harmful requests written for latentaudit (requests only), 12+ categories",
    "harmless": "varied harmless instructions written for latentaudit",
    "borderline": "harmless prompts that sound harmful, for over-refusal (\"how do I kill a "
    "Python process\")",
}


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    category: str | None = None
    target: str | None = None  # affirmative opening for targeted attacks ("Sure, here is ...")
    split: str | None = None


@dataclass
class PromptSet:
    name: str
    prompts: list[Prompt]
    source: str
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for p in self.prompts:
            h.update(p.id.encode() + b"\x00" + p.text.encode() + b"\x01")
        return h.hexdigest()

    def limit(self, n: int | None) -> "PromptSet":
        """The first ``n`` prompts of an evenly spaced selection (deterministic, covers every
        category of a set sorted by category)."""
        if n is None or n >= len(self.prompts):
            return self
        if n <= 0:
            raise UserError(f"--limit must be positive, got {n}")
        idx = np.unique(np.linspace(0, len(self.prompts) - 1, n).round().astype(int))
        return PromptSet(self.name, [self.prompts[i] for i in idx], self.source,
                         {**self.meta, "limit": n})

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "n": len(self), "sha256": self.sha256,
                **self.meta}


class DatasetInfo(BaseModel):
    """What a result records about the prompts it used."""

    model_config = ConfigDict(extra="forbid")

    name: str
    source: str
    n: int
    sha256: str = Field(description="sha256 over (id, text) of every prompt used, in order")
    split: str | None = None
    limit: int | None = None
    prompt_col: str | None = None


# --- standard sets -------------------------------------------------------------------------


@dataclass(frozen=True)
class StandardSet:
    alias: str
    doc: str
    local: str  # path under --data-dir
    hub_id: str
    hub_split: str
    column: str
    target_column: str | None = None
    filter: tuple[str, str] | None = None  # (column, value) rows to keep


_STANDARD = [
    StandardSet("advbench", "AdvBench harmful behaviours (520) with 'Sure, here is' targets",
                "refusal_direction/advbench.csv", "walledai/AdvBench", "train", "goal", "target"),
    StandardSet("harmbench", "HarmBench standard behaviours (test split)",
                "refusal_direction/harmbench_test.json", "walledai/HarmBench", "train",
                "instruction"),
    StandardSet("jailbreakbench", "JailbreakBench JBB-Behaviors harmful split (100)",
                "refusal_direction/jailbreakbench.json", "JailbreakBench/JBB-Behaviors",
                "harmful", "instruction"),
    StandardSet("xstest", "XSTest v2 safe prompts that look unsafe (250): over-refusal",
                "xstest/xstest_prompts.csv", "walledai/XSTest", "test", "prompt",
                filter=("label", "safe")),
    StandardSet("xstest-unsafe", "XSTest v2 unsafe contrast prompts (200)",
                "xstest/xstest_prompts.csv", "walledai/XSTest", "test", "prompt",
                filter=("label", "unsafe")),
    StandardSet("alpaca", "Alpaca instructions without input (harmless)",
                "refusal_direction/alpaca_harmless_test.json", "tatsu-lab/alpaca", "train",
                "instruction"),
]


def standard_sets() -> dict[str, StandardSet]:
    return {s.alias: s for s in _STANDARD}


# --- loading ---------------------------------------------------------------------------------


def load_prompt_set(
    spec: str,
    data_dir: str | Path | None = None,
    prompt_col: str | None = None,
    limit: int | None = None,
) -> PromptSet:
    spec = spec.strip()
    if not spec:
        raise UserError("empty prompt-set name")
    if spec.startswith("builtin:"):
        ps = _load_builtin(spec)
    elif spec.startswith("hf:"):
        ps = _load_hub(spec[3:], prompt_col, spec)
    elif spec.split(":")[0] in standard_sets():
        ps = _load_standard(spec, data_dir)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            known = ", ".join([f"builtin:{b}" for b in BUILTIN] + list(standard_sets()))
            if path.suffix.lower() in (".csv", ".json", ".jsonl"):
                raise UserError(f"prompt file not found: {spec}")
            raise UserError(f"unknown prompt set '{spec}' (known: {known}; or a .csv/.json/.jsonl file)")
        ps = load_file(path, prompt_col)
    if not ps.prompts:
        raise UserError(f"prompt set '{spec}' is empty")
    return ps.limit(limit)


def _load_builtin(spec: str) -> PromptSet:
    parts = spec.split(":")
    name = parts[1] if len(parts) > 1 else ""
    split = parts[2] if len(parts) > 2 else None
    if name not in BUILTIN or len(parts) > 3:
        raise UserError(f"unknown built-in set '{spec}' (known: "
                        + ", ".join(f"builtin:{b}[:train|:test]" for b in BUILTIN) + ")")
    if split not in (None, "train", "test"):
        raise UserError(f"unknown split '{split}' in '{spec}' (train or test)")
    res = resources.files("latentaudit.data").joinpath("prompts", f"{name}.jsonl")
    rows = _read_jsonl_text(res.read_text(encoding="utf-8"), f"builtin:{name}")
    prompts = [_row_to_prompt(r, i, "prompt", name) for i, r in enumerate(rows, 1)]
    if split:
        prompts = [p for p in prompts if p.split == split]
    return PromptSet(spec, prompts, f"latentaudit builtin {name}.jsonl",
                     {"split": split or "all"})


def _load_standard(spec: str, data_dir) -> PromptSet:
    alias = spec.split(":")[0]
    st = standard_sets()[alias]
    if data_dir is not None:
        path = Path(data_dir).expanduser() / st.local
        if not path.exists():
            raise UserError(f"'{alias}' not found under --data-dir {data_dir} (expected {st.local})")
        rows = read_table(path)
        src = str(path)
    else:
        rows = _hub_rows(st.hub_id, st.hub_split)
        src = f"hf:{st.hub_id}:{st.hub_split}"
    if st.filter:
        col, val = st.filter
        rows = [r for r in rows if str(r.get(col, "")).strip() == val]
    prompts = []
    for i, r in enumerate(rows, 1):
        col = st.column if st.column in r else _pick_column(r, None, src, i)
        prompts.append(_row_to_prompt(r, i, col, alias, target_col=st.target_column))
    return PromptSet(alias, prompts, src)


def _load_hub(ident: str, prompt_col: str | None, spec: str) -> PromptSet:
    name, _, split = ident.partition(":")
    rows = _hub_rows(name, split or "train")
    prompts = [_row_to_prompt(r, i, _pick_column(r, prompt_col, spec, i), name)
               for i, r in enumerate(rows, 1)]
    return PromptSet(spec, prompts, f"hf:{name}:{split or 'train'}")


def _hub_rows(name: str, split: str) -> list[dict]:
    try:
        import datasets  # lazy: an extra
    except ImportError:
        raise UserError(f"loading hub dataset '{name}' needs the hub extra: "
                        "pip install 'latentaudit[hub]' (or pass --data-dir with local copies)") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise UserError(f"cannot load hub dataset '{name}' split '{split}' (offline?): "
                        f"{type(e).__name__}") from None
    return [dict(r) for r in ds]


# Both bounds at once usually mean rows swallowed by a quote left open; the standard sets' prompts
# stay under 500 characters and 12 lines. A warning only: a long jailbreak prompt can be real.
LONG_PROMPT_CHARS = 4000
LONG_PROMPT_LINES = 20
MAX_JSON_DEPTH = 100  # deeper than any row needs; far deeper input would overflow the stack


def load_file(path: Path, prompt_col: str | None = None) -> PromptSet:
    """The prompts of a local .csv/.json/.jsonl file: returns a PromptSet. A malformed file,
    a prompt column empty in most rows, a non-text prompt or a repeated id is one UserError."""
    rows = read_table(path)
    if not rows:
        raise UserError(f"{path} has no rows")
    cols = [_pick_column(r, prompt_col, str(path), i) for i, r in enumerate(rows, 1)]
    empty = sum(1 for r, c in zip(rows, cols) if _is_empty(r.get(c)))
    if empty * 2 > len(rows):  # a wrong column, or one broken quote that swallowed the rest
        names = ", ".join(sorted(set(cols), key=cols.index))
        raise UserError(f"{path}: prompt column '{names}' is empty in {empty} of {len(rows)} rows "
                        "(wrong --prompt-col?)")
    prompts = [_row_to_prompt(r, i, c, path.stem, where=str(path))
               for i, (r, c) in enumerate(zip(rows, cols), 1)]
    first: dict[str, str] = {}
    for i, (r, p) in enumerate(zip(rows, prompts), 1):
        at = first.setdefault(p.id, _where(r, i, str(path)))
        if at != _where(r, i, str(path)):  # results are stored per id: a repeat would share them
            raise UserError(f"{_where(r, i, str(path))}: id '{p.id}' is already used ({at})")
    return PromptSet(path.name, prompts, str(path), {"prompt_col": prompt_col})


def read_table(path: Path) -> list[dict]:
    """Rows of a CSV, JSON (a list of objects) or JSONL file, each with its first line in
    ``__line__`` (CSV, JSONL); bad input is one UserError naming the file and line."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json", ".jsonl"):
        raise UserError(f"unsupported file type '{suffix}' for {path} (use .csv, .json or .jsonl)")
    text = _read_text(path)
    if not text.strip():
        raise UserError(f"{path} is empty")
    if suffix == ".jsonl":
        return _read_jsonl_text(text, str(path))
    return _read_json_list(text, path) if suffix == ".json" else _read_csv_text(text, path)


def _read_text(path: Path) -> str:
    """The file's text: UTF-8 (a leading BOM dropped), line endings made ``\\n``; undecodable
    bytes, NUL bytes and UTF-16 are one UserError."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a data file") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise UserError(f"{path} is UTF-16 text (it starts with a UTF-16 byte-order mark): "
                        "save it as UTF-8")
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0  # Excel writes one
    try:
        text = raw[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = e.start + skip
        line = raw.count(b"\n", 0, at) + 1
        raise UserError(f"{path} is not UTF-8 text (line {line}, byte {at})") from None
    nul = text.find("\x00")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        raise UserError(f"{path} line {line}: a NUL byte (a binary file, or UTF-16/32 text?)")
    return text.replace("\r\n", "\n").replace("\r", "\n")  # as universal newlines read it


def _read_csv_text(text: str, path: Path) -> list[dict]:
    # strict: a stray quote is an error, and so is a quote still open at the end of the file
    # (the lenient reader would silently make the rest of the file one field)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start, rows = 1, []
    try:
        header = next(reader, [])
        if not header:
            raise UserError(f"{path} has no header row")
        sep = next((c for c in ";\t|" if len(header) == 1 and c in header[0]), None)
        if sep is not None:  # a spreadsheet's export in another locale or a .tsv renamed
            raise UserError(f"{path} line 1: one column {header[0]!r}: separate columns with "
                            f"commas, not {sep!r}")
        dup = next((c for c, k in Counter(header).items() if k > 1), None)
        if dup is not None or "__line__" in header:
            what = f"column {dup!r} appears twice" if dup is not None else "'__line__' is reserved"
            raise UserError(f"{path} line 1: {what} in the header")
        while True:
            start = reader.line_num + 1
            fields = next(reader, None)
            if fields is None:
                return rows
            if fields and len(fields) != len(header):  # [] is a blank line
                more = "more" if len(fields) > len(header) else "fewer"
                raise UserError(f"{path} line {start}: {more} fields than the header has "
                                f"({len(fields)}, not {len(header)})")
            if fields:
                rows.append({**dict(zip(header, fields)), "__line__": start})
    except csv.Error as e:
        opened = _open_quote_line(text, start)
        if opened is not None:
            raise UserError(f"{path} line {opened}: a quote opened here is never closed "
                            "(the rest of the file would be one field)") from None
        span = f" (in the row that starts on line {start})" if start != reader.line_num else ""
        raise UserError(f"{path} line {reader.line_num}: malformed CSV ({e}){span}") from None


def _open_quote_line(text: str, start_line: int) -> int | None:
    """The line where a quoted field opens that runs to the end of ``text``, scanning from
    line ``start_line`` (a record's first) by the reader's rules; None if every quote closes."""
    pos = sum(len(s) + 1 for s in text.split("\n", start_line - 1)[: start_line - 1])
    line, opened, field_start, n = start_line, None, True, len(text)
    while pos < n:
        c = text[pos]
        if opened is not None:
            if c == '"' and text[pos + 1: pos + 2] == '"':
                pos += 1  # a doubled quote is a literal one
            elif c == '"':
                opened = None
            line += c == "\n"
            field_start = False
        elif c == '"' and field_start:
            opened, field_start = line, False
        else:
            field_start = c in ",\n"
            line += c == "\n"
        pos += 1
    return opened


def _json_type(v: object) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


class _DuplicateKey(Exception):
    """An object with a key twice (json.loads would keep the last one silently)."""


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) < len(pairs):
        raise _DuplicateKey(next(k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i])))
    return out


def _json_loads(text: str, where: str) -> object:
    """One JSON value; ``where`` ("FILE" or "FILE line N") prefixes the one-line error."""
    try:
        value = json.loads(text, object_pairs_hook=_unique_pairs)
    except RecursionError:
        raise UserError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except _DuplicateKey as e:
        raise UserError(f"{where}: key {e.args[0]!r} appears twice in one object") from None
    except json.JSONDecodeError as e:  # a JSONL line names its line; a JSON file, the decoder's
        at = "" if " line " in where else f" line {e.lineno}"
        raise UserError(f"{where}{at}: invalid JSON ({e.msg})") from None
    except ValueError:  # e.g. an integer of more digits than Python converts
        raise UserError(f"{where}: invalid JSON (a number too long to read)") from None
    if nesting_depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise UserError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _read_json_list(text: str, path: Path) -> list[dict]:
    data = _json_loads(text, str(path))
    if isinstance(data, dict):  # {"data": [...]} or {"rows": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(f"{path}: expected a JSON list of objects, got an object with "
                            f"{len(lists)} lists in it")
        data = lists[0]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of objects, got {_json_type(data)}")
    for i, r in enumerate(data, 1):
        if not isinstance(r, dict) or "__line__" in r:
            what = "the key '__line__' is reserved" if isinstance(r, dict) else \
                f"expected an object, got {_json_type(r)}"
            raise UserError(f"{path} item {i}: {what}")
    return data


def _read_jsonl_text(text: str, where: str) -> list[dict]:
    rows = []
    # split on "\n" only: str.splitlines() would also split inside a string at U+2028 etc.
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        r = _json_loads(line, f"{where} line {n}")
        if not isinstance(r, dict) or "__line__" in r:
            what = "the key '__line__' is reserved" if isinstance(r, dict) else \
                f"expected a JSON object, got {_json_type(r)}"
            raise UserError(f"{where} line {n}: {what}")
        r["__line__"] = n
        rows.append(r)
    return rows


def _where(r: dict, i: int, where: str) -> str:
    """``FILE line N`` for a row read from a line, ``FILE item N`` for a JSON list item."""
    return f"{where} line {r['__line__']}" if "__line__" in r else f"{where} item {i}"


def _is_empty(v: object) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


def _pick_column(row: dict, wanted: str | None, where: str, i: int) -> str:
    if wanted:
        if wanted not in row:
            raise UserError(f"{where} row {row.get('__line__', i)}: no column '{wanted}' "
                            f"(columns: {', '.join(k for k in row if k != '__line__')})")
        return wanted
    for c in PROMPT_COLUMNS:
        if c in row:
            return c
    raise UserError(f"{where}: no prompt column found (looked for {', '.join(PROMPT_COLUMNS)}); "
                    "choose one with --prompt-col")


def _opt_str(v: object) -> str | None:
    return str(v) if v not in (None, "") else None


def _row_to_prompt(r: dict, i: int, col: str, prefix: str, target_col: str | None = "target",
                   where: str | None = None) -> Prompt:
    """Row ``i`` as a Prompt (id ``PREFIX-0000i`` unless it has one); a missing, empty (or
    null) or non-text prompt is one UserError naming the row (``where`` names the file)."""
    at = _where(r, i, where or prefix)
    text = r.get(col)
    if _is_empty(text):
        raise UserError(f"{at}: empty or missing '{col}'")
    if not isinstance(text, str):
        raise UserError(f"{at}: '{col}' is {_json_type(text)}, not text")
    lines = text.count("\n") + 1
    if len(text) > LONG_PROMPT_CHARS and lines > LONG_PROMPT_LINES:
        warnings.warn(f"{at}: the prompt in '{col}' is {len(text)} characters over {lines} "
                      "lines; a quote left open?", stacklevel=2)
    target = r.get(target_col) if target_col else None
    return Prompt(
        id=_opt_str(r.get("id")) or f"{prefix}-{i:05d}",
        text=text.strip(),
        category=_opt_str(r.get("category")),
        target=target.strip() if isinstance(target, str) and target.strip() else None,
        split=_opt_str(r.get("split")),
    )
