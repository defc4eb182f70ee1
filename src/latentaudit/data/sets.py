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

import csv
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..errors import UserError

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
        rows = _read_rows(path)
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


def load_file(path: Path, prompt_col: str | None = None) -> PromptSet:
    rows = _read_rows(path)
    if not rows:
        raise UserError(f"{path} has no rows")
    prompts = [_row_to_prompt(r, i, _pick_column(r, prompt_col, str(path), i), path.stem)
               for i, r in enumerate(rows, 1)]
    return PromptSet(path.name, prompts, str(path), {"prompt_col": prompt_col})


def read_table(path: Path) -> list[dict]:
    """Rows of a CSV, JSON (a list of objects) or JSONL file; one-line errors name the line."""
    return _read_rows(path)


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start})") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a data file") from None
    if not text.strip():
        raise UserError(f"{path} is empty")
    if suffix == ".jsonl":
        return _read_jsonl_text(text, str(path))
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {e.lineno}: invalid JSON ({e.msg})") from None
        if isinstance(data, dict):  # {"data": [...]} or {"rows": [...]}
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of objects")
        for i, r in enumerate(data, 1):
            if not isinstance(r, dict):
                raise UserError(f"{path} item {i}: expected an object, got {type(r).__name__}")
        return data
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines(keepends=True))
        if not reader.fieldnames:
            raise UserError(f"{path} has no header row")
        rows = []
        for r in reader:
            if None in r:  # more fields than the header
                raise UserError(f"{path} line {reader.line_num}: more fields than the header has")
            if any(v is None for v in r.values()):
                raise UserError(f"{path} line {reader.line_num}: fewer fields than the header has")
            r["__line__"] = reader.line_num
            rows.append(r)
        return rows
    raise UserError(f"unsupported file type '{suffix}' for {path} (use .csv, .json or .jsonl)")


def _read_jsonl_text(text: str, where: str) -> list[dict]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where} line {n}: invalid JSON ({e.msg})") from None
        if not isinstance(r, dict):
            raise UserError(f"{where} line {n}: expected a JSON object")
        r["__line__"] = n
        rows.append(r)
    return rows


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


def _row_to_prompt(r: dict, i: int, col: str, prefix: str, target_col: str | None = "target") -> Prompt:
    line = r.get("__line__", i)
    text = r.get(col)
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{prefix} line {line}: empty or missing '{col}'")
    target = r.get(target_col) if target_col else None
    pid = r.get("id")
    return Prompt(
        id=str(pid) if pid not in (None, "") else f"{prefix}-{i:05d}",
        text=text.strip(),
        category=(str(r["category"]) if r.get("category") not in (None, "") else None),
        target=target.strip() if isinstance(target, str) and target.strip() else None,
        split=r.get("split"),
    )
