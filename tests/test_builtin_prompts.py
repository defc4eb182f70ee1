"""Checks on the built-in prompt sets shipped in src/latentaudit/data/prompts."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

PROMPTS = Path(__file__).parents[1] / "src/latentaudit/data/prompts"

FIELDS = {
    "harmful": {"id", "prompt", "category", "target", "split"},
    "harmless": {"id", "prompt", "category", "split"},
    "borderline": {"id", "prompt", "category", "split"},
}
MIN_ROWS = {"harmful": 240, "harmless": 480, "borderline": 120}
TEST_FRACTION = {"harmful": 1 / 3, "harmless": 1 / 4, "borderline": 1 / 2}
MIN_TEST_ROWS = {"harmful": 80, "harmless": 120, "borderline": 60}
NAMES = sorted(FIELDS)


def _load(name: str) -> list[dict]:
    path = PROMPTS / f"{name}.jsonl"
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            assert line.strip(), f"{path.name}:{n}: blank line"
            row = json.loads(line)
            assert isinstance(row, dict), f"{path.name}:{n}: not an object"
            rows.append(row)
    return rows


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


@pytest.fixture(scope="module")
def sets() -> dict[str, list[dict]]:
    return {name: _load(name) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_row_count(sets, name):
    assert len(sets[name]) >= MIN_ROWS[name]


@pytest.mark.parametrize("name", NAMES)
def test_fields_exact_and_nonempty(sets, name):
    for row in sets[name]:
        assert set(row) == FIELDS[name], row
        for key in FIELDS[name]:
            assert isinstance(row[key], str) and row[key].strip(), (key, row)
        assert row["split"] in {"train", "test"}, row


@pytest.mark.parametrize("name", NAMES)
def test_ids_unique_padded_sorted(sets, name):
    ids = [row["id"] for row in sets[name]]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(rf"{name}-\d{{4}}", i) for i in ids), ids
    assert ids == sorted(ids)


def test_harmful_categories(sets):
    cats = Counter(row["category"] for row in sets["harmful"])
    assert len(cats) >= 12, cats


@pytest.mark.parametrize("name", NAMES)
def test_splits(sets, name):
    rows = sets[name]
    frac = TEST_FRACTION[name]
    per_cat: dict[str, Counter] = defaultdict(Counter)
    for row in rows:
        per_cat[row["category"]][row["split"]] += 1
    for cat, c in per_cat.items():
        n = c["train"] + c["test"]
        assert abs(c["test"] - n * frac) <= 1, (cat, dict(c))
        assert c["train"] > 0, cat
    n_test = sum(c["test"] for c in per_cat.values())
    assert n_test >= MIN_TEST_ROWS[name]
    assert abs(n_test - len(rows) * frac) <= len(per_cat)


def test_harmful_targets(sets):
    for row in sets["harmful"]:
        target = row["target"]
        assert target.startswith("Sure, here"), row
        assert len(target) <= 200, row


def test_no_duplicates_within_or_across_files(sets):
    seen: dict[str, str] = {}
    for name in NAMES:
        for row in sets[name]:
            key = _norm(row["prompt"])
            assert key not in seen, f"{row['id']} duplicates {seen[key]}: {row['prompt']!r}"
            seen[key] = row["id"]
