"""Fuzzing the input loaders: prompt files (CSV, JSON, JSONL), YAML configs and label files for
`latentaudit judge --labels`. Whatever the bytes, a loader returns a valid result or raises
UserError with one line; nothing else escapes. Round trips check that well-formed files read
back exactly what was written, and that a quote left open is reported at the line it opened."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from latentaudit.cli import main
from latentaudit.config import RunConfig, read_config_file, resolve_config
from latentaudit.data.sets import PromptSet, load_prompt_set, read_table
from latentaudit.errors import UserError
from latentaudit.judges import agreement as ag

# bounded: the whole file runs in well under a minute on a busy 2-core machine
FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(FUZZ, max_examples=40)

TEXT = st.characters(codec="utf-8")  # any encodable character (no lone surrogates)
TEXT_NO_NUL = st.characters(codec="utf-8", exclude_characters="\x00")
# characters that move parsers: quotes, separators, every kind of line break, BOM, NUL, tab
TRICKY = st.sampled_from(list('",\n\r\t \x00\x0b\x0c\x1c\x85\u2028\u2029\ufeff{}[]:#&*-|>!\'\\'))
FUZZ_TEXT = st.lists(st.one_of(TRICKY, TEXT, st.sampled_from(["prompt", "target", "id", "null"])),
                     max_size=100).map("".join)
PROMPT = st.text(st.one_of(TEXT_NO_NUL, TRICKY.filter(lambda c: c != "\x00")), min_size=1,
                 max_size=60).filter(lambda s: s.strip())


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def one_line_or(fn, *args, **kw):
    """fn's result, or the UserError it raised after checking its message is one line; any
    other exception fails the test."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fn(*args, **kw)
    except UserError as e:
        msg = str(e)
        assert msg.strip() and len(msg.splitlines()) == 1, repr(msg)
        event(f"{fn.__name__}: UserError")  # --hypothesis-show-statistics shows the mix
        return e
    event(f"{fn.__name__}: accepted")
    return result


def check_prompt_file(path: Path) -> None:
    for result in (one_line_or(read_table, path), one_line_or(load_prompt_set, str(path))):
        if isinstance(result, PromptSet):
            assert len(result) > 0 and len({p.id for p in result.prompts}) == len(result)
            assert all(isinstance(t, str) and t and t == t.strip() for t in result.texts)
        elif isinstance(result, list):
            assert all(isinstance(r, dict) for r in result)


def norm(s: str) -> str:
    """What a prompt reads back as: line endings made \\n (as universal newlines), stripped."""
    return s.replace("\r\n", "\n").replace("\r", "\n").strip()


# ----------------------------------------------------------------------------- prompt files

@FUZZ
@given(body=FUZZ_TEXT, header=st.sampled_from(["", "prompt\n", "prompt,target\n", "id,prompt\n"]),
       suffix=st.sampled_from([".csv", ".json", ".jsonl"]))
def test_fuzzed_text_prompt_files(work, body, header, suffix):
    p = work / f"t{suffix}"
    p.write_bytes((header + body).encode("utf-8"))
    check_prompt_file(p)


@FUZZ
@given(data=st.binary(max_size=200), suffix=st.sampled_from([".csv", ".json", ".jsonl"]))
def test_fuzzed_bytes_prompt_files(work, data, suffix):
    p = work / f"b{suffix}"
    p.write_bytes(data)
    check_prompt_file(p)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(TEXT, max_size=20),
    lambda kids: st.lists(kids, max_size=4)
    | st.dictionaries(st.sampled_from(["prompt", "id", "target", "category", "split", "x"]), kids,
                      max_size=4),
    max_leaves=12)


@FUZZ
@given(value=JSON_VALUES, as_lines=st.booleans())
def test_fuzzed_json_values(work, value, as_lines):
    if as_lines:  # JSONL: each element of a list on its own line
        p = work / "v.jsonl"
        items = value if isinstance(value, list) else [value]
        p.write_text("\n".join(json.dumps(v) for v in items), encoding="utf-8")
    else:
        p = work / "v.json"
        p.write_text(json.dumps(value), encoding="utf-8")
    check_prompt_file(p)


@FUZZ
@given(rows=st.lists(st.tuples(PROMPT, st.text(TEXT_NO_NUL, max_size=10)), min_size=1, max_size=6),
       crlf=st.booleans(), bom=st.booleans())
def test_csv_round_trip(work, rows, crlf, bom):
    buf = io.StringIO()
    w = (csv.writer(buf) if crlf else  # CRLF, quoting only where needed
         csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL))  # a lone \r needs quotes
    w.writerow(["prompt", "target"])
    w.writerows(rows)
    p = work / "rt.csv"
    p.write_bytes(("\ufeff" if bom else "").encode() + buf.getvalue().encode("utf-8"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ps = load_prompt_set(str(p))
    assert ps.texts == [norm(r[0]) for r in rows]


@FUZZ
@given(prompts=st.lists(PROMPT, min_size=1, max_size=6), blanks=st.lists(st.booleans(), max_size=6),
       ascii_only=st.booleans(), crlf=st.booleans(), bom=st.booleans())
def test_jsonl_round_trip(work, prompts, blanks, ascii_only, crlf, bom):
    lines = []
    for i, text in enumerate(prompts):
        lines.append(json.dumps({"prompt": text, "n": i}, ensure_ascii=ascii_only))
        if i < len(blanks) and blanks[i]:
            lines.append("   ")  # a blank line in the middle is allowed
    p = work / "rt.jsonl"
    p.write_bytes(("\ufeff" if bom else "").encode() + ("\r\n" if crlf else "\n").join(lines).encode())
    ps = load_prompt_set(str(p))
    assert ps.texts == [t.strip() for t in prompts]  # JSON escapes \r: only the line ends change


@FUZZ
@given(rows=st.lists(PROMPT, max_size=5), tail=st.text(st.one_of(TEXT, TRICKY), max_size=80),
       second=st.booleans())
def test_unterminated_quote_names_the_line_it_opened(work, rows, tail, second):
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["prompt", "target"])
    w.writerows([(r, "t") for r in rows])
    good = buf.getvalue()
    tail = tail.replace('"', "").replace("\x00", "")
    opened = norm(good + "x").count("\n") + 1  # the line the broken row starts on
    p = work / "open.csv"
    p.write_bytes((good + ('ok,"' if second else '"') + tail).encode("utf-8"))
    with pytest.raises(UserError) as e:
        load_prompt_set(str(p))
    assert f"line {opened}: a quote opened here is never closed" in str(e.value)


# ----------------------------------------------------------------------------- YAML configs

YAML_TEXT = st.lists(st.one_of(st.sampled_from(list(":- \n\t&*[]{}!#|>'\"?,%@`~<")), TEXT,
                               st.sampled_from(["model", "limit", "behave", "judge", "  ", "- "])),
                     max_size=100).map("".join)


def check_config(path: Path) -> None:
    data = one_line_or(read_config_file, path)
    if isinstance(data, UserError):
        return
    assert isinstance(data, dict)
    cfg = one_line_or(resolve_config, str(path), {})
    assert isinstance(cfg, (RunConfig, UserError))


@FUZZ
@given(text=YAML_TEXT)
def test_fuzzed_yaml_text(work, text):
    p = work / "c.yaml"
    p.write_text(text, encoding="utf-8")
    check_config(p)


@FUZZ
@given(data=st.binary(max_size=200))
def test_fuzzed_yaml_bytes(work, data):
    p = work / "b.yaml"
    p.write_bytes(data)
    check_config(p)


CONFIG_KEYS = st.sampled_from(["model", "limit", "seed", "device", "batch_size", "judge", "behave"])


@FUZZ
@given(cfg=st.dictionaries(CONFIG_KEYS, JSON_VALUES, min_size=1, max_size=5), dup=st.booleans())
def test_generated_configs_and_repeated_keys(work, cfg, dup):
    text = yaml.safe_dump(cfg, sort_keys=False)
    key = next(iter(cfg))
    if dup:
        text += f"{key}: 1\n"
    p = work / "g.yaml"
    p.write_text(text, encoding="utf-8")
    if dup:
        n = text.count("\n")
        with pytest.raises(UserError, match=f"line {n}: key '{key}' appears twice"):
            read_config_file(p)
    else:
        assert read_config_file(p) == cfg
        check_config(p)


# ----------------------------------------------------------------------------- label files

LABEL = st.one_of(st.sampled_from(["refusal", "compliance", "Refusal ", "1_full_compliance",
                                   "2_full_refusal", "3_partial_refusal", "yes", "0", ""]),
                  st.none(), st.booleans(), st.integers(-2, 2), st.floats(), st.text(TEXT, max_size=8),
                  st.lists(st.integers(), max_size=2))
LABEL_MAP = st.one_of(st.sampled_from(["auto", "xstest", "identity", "yes=refusal,no=compliance",
                                       "1=refusal,0=compliance", "=refusal", "a=b", ","]),
                      st.text(st.one_of(st.sampled_from(list("=,")), TEXT), max_size=20))
ROW = st.fixed_dictionaries({"prompt": st.one_of(st.text(TEXT, max_size=20), st.none(), st.integers()),
                             "response": st.one_of(st.text(TEXT, max_size=20), st.none(),
                                                   st.just(0), st.booleans()),
                             "label": LABEL})


def write_rows(path: Path, rows: list[dict]) -> None:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:  # CSV: every value as text, as a spreadsheet would save it
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["prompt", "response", "label"])
        w.writerows([["" if r[k] is None else str(r[k]) for k in ("prompt", "response", "label")]
                     for r in rows])
        path.write_text(buf.getvalue(), encoding="utf-8")


@FUZZ
@given(rows=st.lists(ROW, max_size=6), suffix=st.sampled_from([".csv", ".jsonl"]), spec=LABEL_MAP)
def test_fuzzed_label_files(work, rows, suffix, spec):
    p = work / f"labels{suffix}"
    if rows:
        write_rows(p, rows)
    else:
        p.write_text("")
    data = one_line_or(ag.read_judge_input, p, "prompt", "response", "label")
    if isinstance(data, UserError):
        return
    assert len(data.prompts) == len(data.responses) == len(data.label_values) == len(rows)
    assert all(isinstance(x, str) for x in data.prompts + data.responses)
    resolved = one_line_or(ag.resolve_label_map, spec, data.label_values)
    if isinstance(resolved, UserError):
        return
    name, mapping = resolved
    gold = one_line_or(ag.apply_label_map, data.label_values, mapping, data.where, name)
    assert isinstance(gold, UserError) or (gold.dtype == bool and gold.shape == (len(rows),))


@FEW
@given(rows=st.lists(ROW, max_size=5), suffix=st.sampled_from([".csv", ".jsonl"]),
       spec=LABEL_MAP, garbage=st.one_of(st.none(), FUZZ_TEXT))
def test_judge_cli_on_fuzzed_label_files(work, rows, suffix, spec, garbage):
    """Through `latentaudit judge --labels`: exit 0 with the report written, or exit 2 with one
    line on stderr and no file."""
    p, out = work / f"cli{suffix}", work / "report.json"
    write_rows(p, rows)
    if garbage is not None:
        with p.open("a", encoding="utf-8") as fh:
            fh.write(garbage)
    out.unlink(missing_ok=True)
    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std), warnings.catch_warnings():
        rc = main(["judge", "-i", str(p), "--out", str(out), "--labels", "label",
                   "--label-map", spec])
    event(f"exit {rc}")
    if rc == 0:
        assert json.loads(out.read_text())["n"] >= 1
    else:
        lines = err.getvalue().strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:"), err.getvalue()
        assert not out.exists()


# ----------------------------------------------------------------------------- fixed cases, CLI

BOMB = ('a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
        + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")))


@pytest.mark.parametrize("content, match", [
    ("- model\n- limit\n", "expected a mapping (key: value lines) at the top level, got list"),
    ("tiny:llama\n", "expected a mapping"),
    ("behave:\n\tmax_new_tokens: 3\n", "line 2: invalid YAML (a tab character"),
    ("model: tiny:llama\nlimit: 2\nmodel: tiny:qwen2\n", "line 3: key 'model' appears twice"),
    ("behave:\n  harmful: a\n  harmful: b\n", "line 3: key 'harmful' appears twice"),
    (BOMB, "line 2: an alias (*a)"),
    ("limit: " + "[" * 2000 + "]" * 2000 + "\n", "nested deeper than 20 levels"),
    ("a: 1\n---\nb: 2\n", "line 2: invalid YAML (expected a single document"),
    ("model: a\x07b\n", "line 1: invalid YAML (character U+0007"),
    (b"model: caf\xe9\n", "line 1: not UTF-8 text"),
    ("model: !!python/object/apply:os.system [ls]\n", "invalid YAML (could not determine a constructor"),
])
def test_bad_config_one_line_exit_2(capsys, tmp_path, monkeypatch, content, match):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(content if isinstance(content, bytes) else content.encode())
    rc = main(["behave", "--config", str(cfg), "-o", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists() and not (tmp_path / "runs").exists()


def test_config_accepts_bom_crlf_anchor_and_inline_merge(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"\xef\xbb\xbfmodel: &m tiny:llama\r\nbehave: {<<: {max_new_tokens: 3}, "
                    b"harmful: builtin:harmful}\r\n")
    got = resolve_config(str(cfg), {})
    assert got.model == "tiny:llama" and got.behave.max_new_tokens == 3


@pytest.mark.parametrize("name, content, match", [
    ("u.csv", 'prompt,response,label\np,r,refusal\n"p2,r2,refusal\np3,r3,refusal\n',
     "line 3: a quote opened here is never closed"),
    ("n.jsonl", '{"prompt": "p", "response": 0, "label": "refusal"}\n',
     "row 1: 'response' is a number, not text"),
    ("l.jsonl", '{"prompt": [1], "response": "r", "label": "refusal"}\n', "'prompt' is a list, not text"),
    ("d.csv", "prompt,response,label,label\np,r,refusal,compliance\n", "column 'label' appears twice"),
    ("z.csv", "prompt,response,label\np,r\x00,refusal\n", "line 2: a NUL byte"),
    ("k.jsonl", '{"prompt": "p", "response": "r", "label": "refusal", "label": "compliance"}\n',
     "key 'label' appears twice"),
])
def test_bad_label_file_one_line_exit_2(capsys, tmp_path, name, content, match):
    inp, out = tmp_path / name, tmp_path / "r.json"
    inp.write_text(content, encoding="utf-8")
    rc = main(["judge", "-i", str(inp), "--out", str(out), "--labels", "label"])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_label_file_null_response_and_crlf_bom(capsys, tmp_path):
    inp, out = tmp_path / "c.csv", tmp_path / "v.jsonl"
    inp.write_bytes(b"\xef\xbb\xbfprompt,response,label\r\nq1,\"I'm sorry, I can't.\",refusal\r\n"
                    b"q2,,refusal\r\nq3,\"Sure,\r\nhere.\",compliance\r\n")
    assert main(["judge", "-i", str(inp), "--out", str(out), "--labels", "label"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [2, 3, 4]  # a row's first line
    assert [r["label"] for r in rows] == ["refusal", "refusal", "compliance"]
    data = ag.read_judge_input(tmp_path / "c.csv", "prompt", "response", "label")
    assert data.responses[2] == "Sure,\nhere." and data.responses[1] == ""
    j = tmp_path / "n.jsonl"
    j.write_text('{"prompt": null, "response": null, "label": "refusal"}\n')
    d = ag.read_judge_input(j, "prompt", "response", "label")
    assert d.prompts == [""] and d.responses == [""]  # null counts as empty
    assert np.array_equal(ag.apply_label_map(d.label_values, ag.IDENTITY, d.where), [True])


def test_behave_cli_bad_prompt_file_writes_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "h.csv"
    p.write_text('prompt\nfine\n"broken\nrest of the file\n')
    rc = main(["behave", "--model", "tiny:llama", "--harmful", str(p), "-o", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "h.csv line 3: a quote opened here is never closed" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
