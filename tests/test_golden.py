"""The tiny-model audit gives the recorded results: every stage of `run` on two models, `compare
--format json --against`, and two zoo cards with their weights (tests/golden_outputs.py says what
is compared and how to regenerate after an intended change of results)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from golden_outputs import GOLDEN, diff, normalise, produce


@pytest.fixture(scope="module")
def produced(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("golden")
    mp = pytest.MonkeyPatch()
    mp.setenv("LATENTAUDIT_CACHE", str(tmp / "cache"))
    mp.chdir(tmp)
    torch.set_num_threads(1)
    try:
        yield produce(tmp)
    finally:
        mp.undo()


@pytest.mark.parametrize("name", ["summary", "compare", "card_safe", "card_dissociated"])
def test_results_match_the_golden_outputs(produced, name):
    gold = normalise(json.loads((GOLDEN / f"{name}.json").read_text()), Path("/nonexistent"))
    new = json.loads(json.dumps(produced[name]))  # the same JSON round trip as the file
    problems = diff(gold, new)
    assert not problems, f"{len(problems)} differences, first: " + "; ".join(problems[:8])


def test_the_diff_sees_a_changed_number():
    assert diff({"a": [1.0, {"b": 0.5}]}, {"a": [1.0, {"b": 0.5000001}]}) == []
    assert diff({"a": [1.0, {"b": 0.5}]}, {"a": [1.0, {"b": 0.51}]}) == ["$.a[1].b: 0.5 -> 0.51"]
    assert diff({"a": 1}, {"a": 1, "c": 2}) == ["$.c: new key"]
    # weight digests: a unit of their 4th decimal passes, a training change does not
    assert diff({"weights": {"w": [64.121]}}, {"weights": {"w": [64.1209]}}) == []
    assert diff({"weights": {"w": [64.121]}}, {"weights": {"w": [64.131]}}) != []
