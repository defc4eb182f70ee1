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


# --- malformed and odd files: one line naming the file and line, or accepted as meant --------

@pytest.mark.parametrize("name, content, match", [
    ("open.csv", 'prompt,target\nok,Sure\n"abc,Sure\ndef,Sure\n',
     "open.csv line 3: a quote opened here is never closed"),
    ("open2.csv", 'prompt,target\n"two\nlines",Sure\nx,"y\n', "line 4: a quote opened here is never closed"),
    ("stray.csv", 'prompt,target\n"abc,Sure\ndef,Sure\n"ghi",Sure\n',
     "line 4: malformed CSV (',' expected after '\"') (in the row that starts on line 2)"),
    ("dup.csv", "prompt,target,prompt\na,b,c\n", "line 1: column 'prompt' appears twice in the header"),
    ("fewer.csv", "prompt,target\na\n", "line 2: fewer fields than the header has (1, not 2)"),
    ("semi.csv", "prompt;target\na;b\n", "line 1: one column 'prompt;target': separate columns with commas"),
    ("nul.csv", "prompt\nab\x00c\n", "nul.csv line 2: a NUL byte"),
    ("most.csv", "prompt,x\n,1\n  ,2\nok,3\n", "prompt column 'prompt' is empty in 2 of 3 rows"),
    ("scalar.json", "42", "expected a JSON list of objects, got a number"),
    ("two.json", '{"a": [], "b": []}', "got an object with 2 lists in it"),
    ("item.json", '[{"prompt": "a"}, "b"]', "item.json item 2: expected an object, got a string"),
    ("nonobj.jsonl", '{"prompt": "a"}\n\n"str"\n',
     "nonobj.jsonl line 3: expected a JSON object, got a string"),
    ("num.jsonl", '{"prompt": "a"}\n{"prompt": 5}\n{"prompt": "c"}\n',
     "line 2: 'prompt' is a number, not text"),
    ("null.jsonl", '{"prompt": "a"}\n{"prompt": null}\n{"prompt": "c"}\n',
     "line 2: empty or missing 'prompt'"),
    ("dupkey.jsonl", '{"prompt": "a", "prompt": "b"}\n', "line 1: key 'prompt' appears twice in one object"),
    ("deep.json", "[" * 5000 + "]" * 5000, "JSON nested deeper than 100 levels"),
    ("deep.jsonl", '{"prompt": "a", "x": ' + "[" * 150 + "]" * 150 + "}\n", "line 1: JSON nested deeper"),
    ("bigint.json", '[{"prompt": ' + "1" * 5000 + "}]", "a number too long to read"),
    ("dupid.jsonl", '{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n',
     "line 2: id 'x' is already used"),
    ("reserved.jsonl", '{"prompt": "a", "__line__": 3}\n', "the key '__line__' is reserved"),
])
def test_malformed_files_name_file_and_line(tmp_path, name, content, match):
    p = tmp_path / name
    p.write_text(content, newline="")
    with pytest.raises(UserError) as e:
        load_prompt_set(str(p))
    assert match in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("data, match", [
    ("prompt\nhi\n".encode("utf-16"), "is UTF-16 text"),
    ("prompt\nhi\ncaf\xe9\n".encode("latin-1"), "is not UTF-8 text (line 3, byte 13)"),
])
def test_wrong_encodings(tmp_path, data, match):
    p = tmp_path / "enc.csv"
    p.write_bytes(data)
    with pytest.raises(UserError, match=match.replace("(", r"\(").replace(")", r"\)")):
        load_prompt_set(str(p))


def test_bom_crlf_blank_lines_and_line_separators_are_accepted(tmp_path):
    (tmp_path / "a.csv").write_bytes(b'\xef\xbb\xbfprompt,target\r\n"two\r\nlines",x\r\n\r\n'
                                     b"c\x0cd\xe2\x80\xa8e,y\r\n")
    a = load_prompt_set(str(tmp_path / "a.csv"))
    # a form feed or U+2028 inside an unquoted field does not split the row
    assert a.texts == ["two\nlines", "c\x0cd\u2028e"] and a.prompts[1].id == "a-00002"
    rows = [json.dumps({"prompt": "p\u2028q", "id": 1}, ensure_ascii=False), "", "  ",
            json.dumps({"prompt": "r", "id": 2})]
    (tmp_path / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode())
    b = load_prompt_set(str(tmp_path / "b.jsonl"))
    assert b.texts == ["p\u2028q", "r"] and [p.id for p in b.prompts] == ["1", "2"]
    (tmp_path / "c.json").write_bytes(b'\xef\xbb\xbf[{"prompt": "x"}]')
    assert load_prompt_set(str(tmp_path / "c.json")).texts == ["x"]


def test_long_multiline_prompt_warns_but_loads(tmp_path):
    from latentaudit.data.sets import LONG_PROMPT_CHARS, LONG_PROMPT_LINES

    long = "\n".join(["x" * (LONG_PROMPT_CHARS // LONG_PROMPT_LINES + 10)] * (LONG_PROMPT_LINES + 1))
    wide = "y" * (LONG_PROMPT_CHARS * 2)  # long but one line: no warning
    p = tmp_path / "l.jsonl"
    p.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ["short", long, wide]))
    with pytest.warns(UserWarning, match=r"l.jsonl line 2: the prompt in 'prompt' is \d+ characters "
                      rf"over {LONG_PROMPT_LINES + 1} lines") as rec:
        ps = load_prompt_set(str(p))
    assert len(rec) == 1 and ps.texts[1] == long and len(ps) == 3
