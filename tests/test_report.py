"""``latentaudit report`` and ``latentaudit compare`` on a real tiny-model run folder: the report
is rebuilt from the folder alone (no model), survives a missing stage, never writes into the data,
escapes every untrusted string (checked on the HTML string and in headless Chromium), and compare
prints the headline numbers in four formats with the documented JSON keys."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from latentaudit.cli import main

# the golden run's judge, "golden-hash": deterministic refusals on a random model
from golden_outputs import GoldenHashJudge  # noqa: F401  (registers it)
from latentaudit.runs.store import ResultStore

REPO = Path(__file__).resolve().parents[1]
SCRIPT_PAYLOAD = "<script>window.__pwned=1</script>"
IMG_PAYLOAD = '<img src=x onerror="window.__pwned=1">'
EVIL = f"{SCRIPT_PAYLOAD} {IMG_PAYLOAD}"
JSON_KEYS = ["model", "S", "over_refusal", "lvs", "lvs_layer", "lvs_family", "directions_from",
             "r_ft", "ag_latent", "ag_ft", "run_dir", "judge"]
ESTIMATE_KEYS = {"value", "lo", "hi", "n"}


def run_cli(capsys, *args):
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One real run on tiny:llama with every stage: behave, latent (pgd, steer, noise, ablate on
    three layers), the fine-tuning attack and its benign control (~20 s on one core)."""
    from latentaudit.config import RunConfig
    from latentaudit.pipeline import run_audit

    base = tmp_path_factory.mktemp("report-run")
    pairs = base / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Tell me how to do bad thing {i}.",
                                         "completion": "Step 1: gather the materials. Step 2: begin."})
                             + "\n" for i in range(6)))
    out = base / "run"
    cfg = RunConfig(
        model="tiny:llama", limit=5, device="cpu", output_dir=str(out), progress="none",
        behave={"max_new_tokens": 4, "judge": "golden-hash"},
        latent={"layers": "1,2,3", "families": ["pgd", "steer", "noise", "ablate"],
                "max_new_tokens": 4, "success": "nonrefusal", "family_params": {"pgd": {"steps": 2}, "noise": {"draws": 1}},
                "directions_n": 12, "selection_n": 4, "calibration_n": 8},
        tamper={"steps": [0, 1, 2], "n_examples": 4, "lr": 1e-2, "batch_size": 2, "rank": 4,
                "alpha": 8, "pairs": str(pairs), "completion_tokens": 16, "utility_limit": 4})
    run_audit(cfg, ["behave", "latent", "tamper", "tamper_control"], "latentaudit test-run")
    assert (out / "summary.json").is_file() and (out / "store.sqlite").is_file()
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in dst.glob("store.sqlite-*"):
        p.unlink()
    (dst / "report.html").unlink(missing_ok=True)
    return dst


def read_summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def write_summary(run: Path, s: dict) -> None:
    (run / "summary.json").write_text(json.dumps(s, indent=2))


def tamper(run: Path) -> dict:
    """Untrusted text everywhere a string reaches the report: model responses in the store, the
    model name, the command, the judge name and a definition (an attribute) in summary.json."""
    s = read_summary(run)
    m = s["models"][0]
    m["model"]["spec"] = f"tiny:llama {SCRIPT_PAYLOAD} $x^2$"
    s["command"] = IMG_PAYLOAD
    m["behave"]["judge"]["name"] = EVIL
    fam = m["latent"]["families"]["pgd"]
    fam["lvs_model"]["definition"] += f'" onmouseover="window.__pwned=1" {SCRIPT_PAYLOAD}'
    write_summary(run, s)
    with ResultStore(run / "store.sqlite") as st:
        items = [(k, "latent", {**rec, "response": f"{EVIL} {rec.get('response', '')}"})
                 for k, rec in st.items(f"latent/{m['key']}/")]
        st.put_many(items)
    return s


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(html: str) -> _Tags:
    p = _Tags()
    p.feed(html)
    return p


def assert_no_markup_injected(html: str) -> None:
    t = parse(html)
    scripts = [a for tag, a in t.tags if tag == "script"]
    assert len(scripts) == 1, "only the report's own script"
    for tag, attrs in t.tags:
        assert not any(k.startswith("on") for k in attrs), (tag, attrs)
        if tag == "img":
            assert attrs["src"].startswith("data:image/png;base64,"), attrs
        for k in ("src", "href"):
            assert not str(attrs.get(k) or "").startswith(("http:", "https:", "//")), attrs


# --------------------------------------------------------------------------------------------
# report


def test_report_rebuilt_from_the_run_folder_alone(tiny_run, tmp_path, capsys, monkeypatch):
    run = copy_run(tiny_run, tmp_path / "run")
    import latentaudit.models.loader as loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("report loaded a model"))
    before = {p.name: digest(p) for p in run.iterdir()}
    rc, out, err = run_cli(capsys, "report", run)
    assert rc == 0, err
    first = (run / "report.html").read_text()
    (run / "report.html").unlink()
    rc, out, err = run_cli(capsys, "report", run)  # rebuilt after deleting it
    assert rc == 0, err
    assert "report.html" in out
    html = (run / "report.html").read_text()
    # the data are untouched and nothing else appeared in the folder
    assert {p.name: digest(p) for p in run.iterdir() if p.name != "report.html"} == before
    strip = lambda h: re.sub(r"generated [^·]*·", "", h)  # noqa: E731
    assert strip(html) == strip(first)

    s = read_summary(run)
    m = s["models"][0]
    t = parse(html)
    assert ("table", {"id": "headline"}) in t.tags
    # the headline numbers with their definitions as tooltips
    from latentaudit.metrics.stats import Estimate
    from latentaudit.report.compare import fmt_estimate

    for est in (m["behave"]["S"], m["latent"]["families"]["pgd"]["lvs_model"],
                m["latent"]["families"]["pgd"]["audit_gap"], m["tamper"]["R_ft"], m["tamper"]["AG_ft"]):
        e = Estimate(**est)
        v, rest = fmt_estimate(e).split(" ", 1)
        assert f'<span class="v">{v}</span> <span class="ci">{rest}</span>' in html
        assert any(a.get("title", "").startswith(e.definition) for _, a in t.tags)
    # plots inline: depth profile, ASR curves, heat map, r(s), scatter
    imgs = [a for tag, a in t.tags if tag == "img"]
    assert len(imgs) == 5
    for a in imgs:
        png = base64.b64decode(a["src"].split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert_no_markup_injected(html)
    # sample transcripts from the store: clean and perturbed responses at the worst layer
    assert "Sample transcripts" in html and html.count('class="transcript"') == 5
    assert "perturbed · ε =" in html


def test_report_with_a_stage_missing(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    s = read_summary(run)
    s["models"][0]["latent"] = None  # e.g. summary.json rewritten by a later behave-only command
    write_summary(run, s)
    rc, _, err = run_cli(capsys, "report", run, "--out", tmp_path / "a" / "r.html")
    assert rc == 0, err
    html = (tmp_path / "a" / "r.html").read_text()
    assert "not run" in html and "Sample transcripts" not in html
    assert "store.sqlite holds latent records for this model that summary.json does not include" in html

    s["models"][0]["latent"] = read_summary(tiny_run)["models"][0]["latent"]
    s["models"][0]["behave"] = s["models"][0]["tamper"] = s["models"][0]["tamper_control"] = None
    write_summary(run, s)
    rc, _, err = run_cli(capsys, "report", run)
    assert rc == 0, err
    html = (run / "report.html").read_text()
    assert "Sample transcripts" in html and "Behaviour against robustness" in html  # S_clean
    assert "refusal vs fine-tuning steps" not in html

    (run / "store.sqlite").unlink()  # summary alone: numbers and plots, no transcripts
    rc, _, err = run_cli(capsys, "report", run)
    assert rc == 0, err
    assert "store.sqlite is missing" in (run / "report.html").read_text()
    (run / "store.sqlite").write_bytes(b"not a database" * 100)  # unreadable: numbers anyway
    rc, _, err = run_cli(capsys, "report", run)
    assert rc == 0, err
    assert "no sample transcripts" in (run / "report.html").read_text()


def test_failed_build_keeps_the_old_report_and_the_data(tiny_run, tmp_path, capsys, monkeypatch):
    run = copy_run(tiny_run, tmp_path / "run")
    (run / "report.html").write_text("old report")
    before = {p.name: digest(p) for p in run.iterdir()}
    import latentaudit.report.html as rh

    def boom(*a, **k):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(rh, "plot_heatmap", boom)
    with pytest.raises(RuntimeError):
        rh.build_report(run)
    assert {p.name: digest(p) for p in run.iterdir()} == before


@pytest.mark.parametrize("make, needle", [
    (lambda d: d / "nope", "not found"),
    (lambda d: d, "has no summary.json"),
    (lambda d: (d / "summary.json").write_text("{not json") and d, "cannot read"),
    (lambda d: (d / "summary.json").write_text('{"kind": "other"}') and d, "not a latentaudit summary"),
])
def test_report_bad_input_is_one_line_exit_2(tmp_path, capsys, make, needle):
    target = make(tmp_path)
    for verb in ("report", "compare"):
        rc, out, err = run_cli(capsys, verb, target)
        assert rc == 2 and needle in err and err.count("\n") == 1, (verb, err)
    assert not (tmp_path / "report.html").exists()


def test_unknown_family_is_a_user_error(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    rc, _, err = run_cli(capsys, "report", run, "--family", "nosuch")
    assert rc == 2 and "family 'nosuch' was not run" in err and err.count("\n") == 1


def test_html_escapes_every_untrusted_string(tiny_run, tmp_path):
    from latentaudit.report.html import render_report

    run = copy_run(tiny_run, tmp_path / "run")
    tamper(run)
    html = render_report(run)
    assert SCRIPT_PAYLOAD not in html and IMG_PAYLOAD not in html
    assert 'onmouseover="window' not in html
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=&#34;window.__pwned=1&#34;&gt;" in html
    assert_no_markup_injected(html)
    t = parse(html)
    text = "".join(t.text)
    assert text.count(SCRIPT_PAYLOAD) >= 5  # model name, judge, transcripts: shown literally
    assert IMG_PAYLOAD in text
    # the only script is ours and the CSP allows exactly it
    csp = next(a["content"] for tag, a in t.tags if a.get("http-equiv") == "Content-Security-Policy")
    assert "default-src 'none'" in csp and "'unsafe-inline'" not in csp.split("script-src")[1]


# --------------------------------------------------------------------------------------------
# the browser


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
             "--hide-scrollbars", "--virtual-time-budget=3000"]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120)


def _screenshot(binary: str, profile: Path, page: Path, png: Path) -> None:
    r = _run_chromium(binary, profile, "--window-size=1280,1500", f"--screenshot={png}",
                      page.resolve().as_uri())
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", r.stderr[-2000:]


def test_report_in_headless_chromium(tiny_run, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary (apt-get install chromium)")
    from latentaudit.report.html import build_report

    run = copy_run(tiny_run, tmp_path / "run")
    tamper(run)
    page = build_report(run)
    r = _run_chromium(binary, tmp_path / "profile", "--dump-dom", page.resolve().as_uri())
    assert r.returncode == 0, r.stderr[-2000:]
    dom = parse(r.stdout)
    assert ("table", {"id": "headline"}) in dom.tags, "the page did not render"
    marker = next(a for tag, a in dom.tags if a.get("id") == "la-integrity")
    assert marker["data-js"] == "ran", "the report's own script did not run (CSP?)"
    assert marker["data-errors"] == "0", "a script error or a failed resource load"
    assert marker["data-pwned"] == "no", "injected model text executed"
    console = [line for line in r.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    text = "".join(dom.text)
    assert SCRIPT_PAYLOAD in text and IMG_PAYLOAD in text  # shown literally, as text
    assert not [a for tag, a in dom.tags if tag == "img" and a.get("src") == "x"]
    assert len([1 for tag, _ in dom.tags if tag == "script"]) == 1

    _screenshot(binary, tmp_path / "profile", page, tmp_path / "tampered.png")
    if os.environ.get("LATENTAUDIT_SCREENSHOT") == "1":  # the README's picture: the clean run
        clean = build_report(copy_run(tiny_run, tmp_path / "clean"))
        (REPO / "docs").mkdir(exist_ok=True)
        _screenshot(binary, tmp_path / "profile", clean, REPO / "docs" / "report.png")


# --------------------------------------------------------------------------------------------
# compare


@pytest.fixture
def two_runs(tiny_run, tmp_path) -> tuple[Path, Path]:
    full = copy_run(tiny_run, tmp_path / "full")
    behave_only = copy_run(tiny_run, tmp_path / "behave-only")
    s = read_summary(behave_only)
    for k in ("latent", "tamper", "tamper_control"):
        s["models"][0][k] = None
    write_summary(behave_only, s)
    return full, behave_only


def test_compare_json_schema(two_runs, capsys, tmp_path):
    full, beh = two_runs
    rc, out, err = run_cli(capsys, "compare", full, beh, "--format", "json")
    assert rc == 0, err
    rows = json.loads(out)
    assert isinstance(rows, list) and len(rows) == 2
    for row in rows:
        assert list(row) == JSON_KEYS
        for k in ("S", "over_refusal", "lvs", "r_ft", "ag_latent", "ag_ft"):
            assert row[k] is None or set(row[k]) == ESTIMATE_KEYS
    s = read_summary(full)["models"][0]
    a, b = rows
    assert a["run_dir"] == str(full) and b["run_dir"] == str(beh)
    assert a["model"] == "tiny:llama" and isinstance(a["lvs_layer"], int)
    pgd = s["latent"]["families"]["pgd"]
    assert a["lvs"] == {k: pgd["lvs_model"][k] for k in ESTIMATE_KEYS}
    assert a["lvs_layer"] == pgd["worst_layer"]
    assert a["ag_latent"] == {k: pgd["audit_gap"][k] for k in ESTIMATE_KEYS}
    assert a["S"]["value"] == s["behave"]["S"]["value"] and a["S"]["n"] == s["behave"]["S"]["n"]
    assert a["over_refusal"]["n"] == s["behave"]["over_refusal_all"]["n"]
    assert a["r_ft"]["value"] == s["tamper"]["R_ft"]["value"]
    assert a["ag_ft"]["value"] == s["tamper"]["AG_ft"]["value"]
    assert b["S"] == a["S"] and b["lvs"] is None and b["lvs_layer"] is None
    assert b["r_ft"] is None and b["ag_latent"] is None and b["ag_ft"] is None
    assert a["lvs_family"] == "pgd" and b["lvs_family"] is None
    assert a["directions_from"] is None  # the run used the audited model's own directions
    # the documented schema lists exactly these keys, in this order
    doc = (REPO / "docs" / "compare_schema.md").read_text()
    table = doc.split("| key ", 1)[1].split("\n\n", 1)[0]
    assert re.findall(r"^\| `(\w+)`", table, flags=re.M) == JSON_KEYS
    # --family picks another family; --out writes the same text to a file
    rc, out2, err = run_cli(capsys, "compare", full, "--format", "json", "--family", "steer",
                            "--out", tmp_path / "c.json")
    assert rc == 0, err
    steer = json.loads((tmp_path / "c.json").read_text())[0]
    assert steer["lvs"]["value"] == s["latent"]["families"]["steer"]["lvs_model"]["value"]


def test_compare_table_csv_markdown(two_runs, capsys):
    full, beh = two_runs
    rc, out, err = run_cli(capsys, "compare", full, beh, "--format", "csv")
    assert rc == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 2 and rows[0]["run_dir"] == str(full) and rows[0]["lvs_family"] == "pgd"
    s = read_summary(full)["models"][0]
    assert float(rows[0]["S"]) == s["behave"]["S"]["value"] and rows[1]["lvs"] == ""
    assert int(rows[0]["lvs_n"]) == s["latent"]["families"]["pgd"]["lvs_model"]["n"]

    rc, out, err = run_cli(capsys, "compare", full, beh, "--format", "markdown")
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 4 and all(line.startswith("|") and line.endswith("|") for line in lines)
    assert "not run" in lines[3]

    rc, out, err = run_cli(capsys, "compare", full, beh)  # table is the default
    assert rc == 0, err
    assert "LVS(M)" in out and str(full) in out and str(beh) in out and "not run" in out
    rc, out, err = run_cli(capsys, "compare", full, "--format", "xml")
    assert rc == 2 and "--format must be one of" in err and err.count("\n") == 1


def test_compare_escapes_markdown_and_keeps_json_text(two_runs, capsys):
    full, _ = two_runs
    s = read_summary(full)
    s["models"][0]["model"]["spec"] = "evil | <b>x</b>\nname"
    write_summary(full, s)
    rc, out, err = run_cli(capsys, "compare", full, "--format", "markdown")
    assert rc == 0, err
    assert "evil \\| &lt;b&gt;x&lt;/b&gt; name" in out and len(out.splitlines()) == 3
    rc, out, err = run_cli(capsys, "compare", full, "--format", "json")
    assert json.loads(out)[0]["model"] == "evil | <b>x</b>\nname"


def test_ag_latent_fallback_without_a_paired_gap(tiny_run):
    """An older summary without S_clean/audit_gap: AG = S − (1 − LVS(M)), with a note."""
    from latentaudit.report.compare import model_headline
    from latentaudit.runs.summary import Summary

    s = read_summary(tiny_run)
    for fr in s["models"][0]["latent"]["families"].values():
        fr.pop("audit_gap", None)
        fr.pop("S_clean", None)
    m = Summary.model_validate(s).models[0]
    h = model_headline(m, "x")
    S, lvs = m.behave.S, m.latent.families["pgd"].lvs_model
    assert h.ag_latent.value == pytest.approx(S.value - (1 - lvs.value))
    assert h.ag_latent.lo == pytest.approx(S.lo + lvs.lo - 1)
    assert any("not paired" in n for n in h.notes)


def _two_models(run: Path) -> tuple[dict, dict]:
    """The run's summary with a second model beside the first: ``probe``, the same latent results
    with its prompts in reverse order (pairing must go by prompt id, not position)."""
    import copy

    s = read_summary(run)
    ref = s["models"][0]
    ref["name"] = "ref"
    probe = copy.deepcopy(ref)
    probe["name"], probe["key"] = "probe", ref["key"] + "-probe"
    lat = probe["latent"]
    lat["prompt_ids"] = lat["prompt_ids"][::-1]
    for fr in lat["families"].values():
        for lr in fr["layers"]:
            lr["eps_star"] = lr["eps_star"][::-1]
    s["models"].append(probe)
    return s, probe


def test_compare_against_pairs_lvs_by_prompt(tiny_run, tmp_path, capsys):
    import numpy as np

    from latentaudit.metrics.lvs import prompt_scores

    run = copy_run(tiny_run, tmp_path / "run")
    s, probe = _two_models(run)
    write_summary(run, s)
    # the same results in another order: a gap of exactly 0, CI [0, 0]
    rc, out, err = run_cli(capsys, "compare", run, "--format", "json", "--against", "ref")
    assert rc == 0, err
    rows = json.loads(out)
    assert list(rows[1]) == JSON_KEYS + ["lvs_gap", "lvs_gap_against"]
    assert rows[0]["lvs_gap"] is None and rows[0]["lvs_gap_against"] == "ref"
    n = len(probe["latent"]["prompt_ids"])
    assert rows[1]["lvs_gap"] == {"value": 0.0, "lo": 0.0, "hi": 0.0, "n": n}

    # the probe elicited half its prompts (by id) at eps_min at its first layer, nothing else:
    # its LVS(M) is that half's share; the gap is that minus ref's LVS(M), from the ε* lists
    lat = probe["latent"]
    ids = lat["prompt_ids"]
    hit = set(sorted(ids)[: (n + 1) // 2])
    fam = lat["families"]["pgd"]
    for k, lr in enumerate(fam["layers"]):
        lr["eps_star"] = [lat["eps_min"] if (k == 0 and p in hit) else None for p in ids]
    write_summary(run, s)
    ref_lat = s["models"][0]["latent"]
    ref_scores = np.stack([prompt_scores(np.array([np.inf if e is None else e for e in lr["eps_star"]]),
                                         ref_lat["eps_min"], ref_lat["eps_max"])
                           for lr in ref_lat["families"]["pgd"]["layers"]], 1)
    want = len(hit) / n - ref_scores.mean(0).max()
    rc, out, err = run_cli(capsys, "compare", run, "--format", "json", "--against", "ref")
    assert rc == 0, err
    gap = json.loads(out)[1]["lvs_gap"]
    assert gap["value"] == pytest.approx(want) and gap["n"] == n
    assert gap["lo"] <= gap["value"] <= gap["hi"] and gap["lo"] < gap["hi"]

    # table, markdown and csv carry the column; without --against nothing changes
    rc, out, err = run_cli(capsys, "compare", run, "--against", "ref")
    assert rc == 0 and "ΔLVS(M) vs ref" in out and f"{want:+.2f} [" in out
    rc, out, err = run_cli(capsys, "compare", run, "--format", "csv", "--against", "ref")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rows[1]["lvs_gap_against"] == "ref" and float(rows[1]["lvs_gap"]) == pytest.approx(want)
    assert rows[0]["lvs_gap"] == ""
    rc, out, err = run_cli(capsys, "compare", run, "--format", "markdown", "--against", "ref")
    assert rc == 0 and "ΔLVS(M) vs ref" in out.splitlines()[0]
    rc, out, err = run_cli(capsys, "compare", run, "--format", "json")
    assert all(list(r) == JSON_KEYS for r in json.loads(out))
    # the report shows the same column
    rc, out, err = run_cli(capsys, "report", run, "--against", "ref", "--out", tmp_path / "r.html")
    assert rc == 0, err
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "ΔLVS(M) vs ref" in page and f">{want:.2f}<" in page.replace("</span>", "<")
    rc, out, err = run_cli(capsys, "report", run, "--out", tmp_path / "plain.html")
    assert "ΔLVS(M)" not in (tmp_path / "plain.html").read_text(encoding="utf-8")


def test_compare_against_bad_input(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    s, probe = _two_models(run)
    probe["latent"]["eps_max"] = 0.25  # another budget range: not comparable, said so
    write_summary(run, s)
    rc, out, err = run_cli(capsys, "compare", run, "--against", "nobody")
    assert rc == 2 and "no model named 'nobody'" in err and err.count("\n") == 1 and out == ""
    from latentaudit.report.compare import compare_runs

    rows = compare_runs([run], against="ref")
    assert rows[1].lvs_gap is None and any("different budget ranges" in x for x in rows[1].notes)
    probe["latent"]["eps_max"] = s["models"][0]["latent"]["eps_max"]
    probe["latent"]["harmful"]["name"] = "mine.csv"  # same ids, another set: not paired
    write_summary(run, s)
    rows = compare_runs([run], against="ref")
    assert rows[1].lvs_gap is None and any("different harmful prompt sets" in x for x in rows[1].notes)
    probe["latent"]["harmful"]["name"] = s["models"][0]["latent"]["harmful"]["name"]
    for stage in ("behave", "latent", "tamper"):  # another judge: its verdicts are not paired
        if probe.get(stage):
            probe[stage]["judge"] = {"name": "guard", "version": "1",
                                     "parameters": {"target": "/models/g"}}
    write_summary(run, s)
    rows = compare_runs([run], against="ref")
    assert rows[1].judge == "guard:/models/g" and rows[0].judge == "golden-hash"
    assert rows[1].lvs_gap is None and any("different judges" in x for x in rows[1].notes)
    rc, out, err = run_cli(capsys, "compare", run)
    assert "judges differ" in out and "guard:/models/g" in out


def test_transcripts_come_from_the_prefixes_the_stage_recorded(tiny_run, tmp_path):
    """The report reads the pushed responses under the store prefix the latent summary
    recorded for the family's worst layer, even when the store holds another settings group
    for the same family and layer (here a copy under other settings with other responses)."""
    from latentaudit.report.html import collect_transcripts
    from latentaudit.runs import keys
    from latentaudit.runs.summary import Summary

    run = copy_run(tiny_run, tmp_path / "run")
    summary = Summary.model_validate(read_summary(run))
    m = summary.models[0]
    fr = m.latent.families["pgd"]
    prefix = m.latent.store_prefixes["families"]["pgd"][str(fr.worst_layer)]
    decoy = keys.latent_layer_prefix(m.key, "pgd", "ffffffffffff", fr.worst_layer)
    with ResultStore(run / "store.sqlite") as st:
        real = list(st.items(prefix))
        assert real
        st.put_many((decoy + k[len(prefix):], "latent", {**rec, "response": "DECOY"})
                    for k, rec in real)
    with ResultStore(run / "store.sqlite", read_only=True) as st:
        ts = collect_transcripts(st, m, "pgd", summary.config)
        pushed = [t for t in ts.items if t.perturbed is not None]
        assert pushed
        for t in pushed:
            assert t.perturbed["response"] != "DECOY"
            assert t.perturbed == st.get(keys.eps_key(prefix, t.prompt_id, t.eps))
    # a summary written before stages recorded their prefixes: said, not guessed
    m.latent.store_prefixes = {}
    with ResultStore(run / "store.sqlite", read_only=True) as st:
        ts = collect_transcripts(st, m, "pgd", summary.config)
    assert ts.items == [] and "predates recorded store prefixes" in ts.notes[0]


def test_the_read_only_store_writes_nothing(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    before = sorted(p.name for p in run.iterdir())
    from latentaudit.errors import UserError

    with ResultStore(run / "store.sqlite", read_only=True) as st:
        assert st.count("behave/") > 0
        with pytest.raises(UserError, match="readonly|read-only|read only"):
            st.put("x", "behave", {})
    assert sorted(p.name for p in run.iterdir()) == before

    with pytest.raises(UserError, match="no such file"):
        ResultStore(tmp_path / "missing.sqlite", read_only=True)
    assert not (tmp_path / "missing.sqlite").exists()
