"""Prompt-set loaders on good and malformed files, aliases, splits and limits."""

from __future__ import annotations

import json

import pytest

from latentaudit.data.sets import load_prompt_set, standard_sets
from latentaudit.errors import UserError


def test_builtin_sets_and_splits():
    full = load_prompt_set("builtin:harmful")
    train = load_prompt_set("builtin:harmful:train")
    test = load_prompt_set("builtin:harmful:test")
    assert len(train) + len(test) == len(full) >= 240
    assert not {p.id for p in train.prompts} & {p.id for p in test.prompts}
    assert all(p.target and p.target.startswith("Sure, here") for p in full.prompts)
    assert len(load_prompt_set("builtin:harmless")) >= 480
    assert len(load_prompt_set("builtin:borderline")) >= 120
    assert full.sha256 != train.sha256


def test_limit_is_deterministic_and_spread():
    a = load_prompt_set("builtin:harmful:test", limit=12)
    b = load_prompt_set("builtin:harmful:test", limit=12)
    assert [p.id for p in a.prompts] == [p.id for p in b.prompts] and len(a) == 12
    assert len({p.category for p in a.prompts}) >= 8  # evenly spaced: many categories


def test_csv_json_jsonl(tmp_path):
    (tmp_path / "a.csv").write_text('goal,target\n"Do X, now",Sure\nDo Y,Sure\n')
    (tmp_path / "b.json").write_text(json.dumps([{"instruction": "I1"}, {"instruction": "I2"}]))
    (tmp_path / "c.jsonl").write_text('{"text": "T1"}\n\n{"text": "T2", "id": "x"}\n')
    assert load_prompt_set(str(tmp_path / "a.csv")).texts == ["Do X, now", "Do Y"]
    assert load_prompt_set(str(tmp_path / "b.json")).texts == ["I1", "I2"]
    c = load_prompt_set(str(tmp_path / "c.jsonl"))
    assert c.texts == ["T1", "T2"] and c.prompts[1].id == "x"
    assert load_prompt_set(str(tmp_path / "a.csv"), prompt_col="target").texts == ["Sure", "Sure"]


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("empty.jsonl", "", "is empty"),
        ("blank.csv", "\n\n", "is empty"),
        ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": broken}\n', "line 2: invalid JSON"),
        ("notobj.jsonl", '{"prompt": "ok"}\n[1, 2]\n', "line 2: expected a JSON object"),
        ("extra.csv", "prompt\nfine\n\"a\",\"b\"\n", "line 3: more fields"),
        ("nocol.csv", "question2\nfoo\n", "no prompt column"),
        ("emptycell.jsonl", '{"prompt": "ok"}\n{"prompt": "  "}\n', "line 2: empty or missing"),
        ("bad.json", '{"a": 1', "line 1: invalid JSON"),
        ("x.txt", "hello", "unsupported file type"),
    ],
)
def test_malformed_files(tmp_path, name, content, match):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(UserError, match=match):
        load_prompt_set(str(p))


def test_missing_column_by_flag(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("prompt\nfoo\n")
    with pytest.raises(UserError, match="row 2: no column 'instruction'"):
        load_prompt_set(str(p), prompt_col="instruction")


@pytest.mark.parametrize("spec, match", [
    ("nosuchset", "unknown prompt set"),
    ("builtin:nope", "unknown built-in set"),
    ("builtin:harmful:val", "unknown split"),
    ("missing.csv", "prompt file not found"),
])
def test_unknown_sets(spec, match):
    with pytest.raises(UserError, match=match):
        load_prompt_set(spec)


def test_hub_dataset_needs_extra_or_network(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError("no")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(UserError, match=r"latentaudit\[hub\]"):
        load_prompt_set("hf:someone/something")
    with pytest.raises(UserError, match="hub extra"):
        load_prompt_set("advbench")  # no --data-dir: resolves to the hub


@pytest.mark.parametrize("alias, n", [("advbench", 520), ("harmbench", 159), ("jailbreakbench", 100),
                                      ("xstest", 250), ("xstest-unsafe", 200), ("alpaca", 6266)])
def test_standard_aliases_from_data_dir(data_dir, alias, n):
    ps = load_prompt_set(alias, data_dir=data_dir)
    assert len(ps) == n and all(p.text for p in ps.prompts)
    if alias == "advbench":
        assert ps.prompts[0].target.startswith("Sure, here is")


def test_alias_missing_under_data_dir(tmp_path):
    with pytest.raises(UserError, match="not found under --data-dir"):
        load_prompt_set("advbench", data_dir=tmp_path)
    assert set(standard_sets()) >= {"advbench", "harmbench", "jailbreakbench", "xstest", "alpaca"}
