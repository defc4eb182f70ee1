"""`latentaudit run`: the multi-model audit config, resume after kill -9, same seed → same summary."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from golden_outputs import write_pairs
from latentaudit.cli import main
from latentaudit.runs.summary import stable_view

TOOL = [sys.executable, "-c", "import sys; from latentaudit.cli import main; sys.exit(main())"]


def _config(tmp_path: Path, **extra) -> Path:
    pairs = write_pairs(tmp_path / "pairs.jsonl", 4)
    cfg = {
        "models": [{"name": "llama", "spec": "tiny:llama"}, {"name": "qwen", "spec": "tiny:qwen2"}],
        "stages": ["behave", "latent", "tamper"],
        "limit": 3, "progress": "none", "seed": 7,
        "behave": {"max_new_tokens": 6},
        "latent": {"layers": "1", "families": ["pgd", "noise"],
                   "family_params": {"pgd": {"steps": 2}, "noise": {"draws": 1}},
                   "max_new_tokens": 6, "calibration_n": 4},
        "tamper": {"pairs": str(pairs), "n_examples": 4, "steps": [0, 1, 2], "batch_size": 2,
                   "completion_tokens": 8, "utility_limit": 2},
        **extra,
    }
    path = tmp_path / "audit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _stable(run_dir: Path) -> dict:
    return stable_view(json.loads((run_dir / "summary.json").read_text()))


def _count(db: Path, prefix: str) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.2)
        try:
            return con.execute("SELECT COUNT(*) FROM results WHERE key LIKE ?",
                               (prefix + "%",)).fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def _run_killed_at(cfg: Path, out: Path, prefix: str, at_least: int, env) -> bool:
    """Start the audit, SIGKILL it once the store holds `at_least` rows under `prefix`.
    Returns False if the run finished before that point was reached."""
    proc = subprocess.Popen(TOOL + ["run", "--config", str(cfg), "-o", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = out / "store.sqlite"
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if db.exists() and _count(db, prefix) >= at_least:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    proc.wait()
    return False


def test_run_many_models_one_summary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _config(tmp_path)
    out = tmp_path / "run"
    assert main(["run", "--config", str(cfg), "-o", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert [m["name"] for m in s["models"]] == ["llama", "qwen"]
    for m in s["models"]:
        assert m["behave"] and m["latent"] and m["tamper"]
        assert set(m["latent"]["families"]) == {"pgd", "noise"}
    assert s["config"]["stages"] == ["behave", "latent", "tamper"]
    # same seed, fresh folder: the same summary apart from clocks
    out2 = tmp_path / "run2"
    assert main(["run", "--config", str(cfg), "-o", str(out2)]) == 0
    assert _stable(out2) == _stable(out)
    # a finished run rerun recomputes nothing and keeps its summary
    before = _count(out / "store.sqlite", "")
    assert main(["run", "--config", str(cfg), "-o", str(out)]) == 0
    assert _count(out / "store.sqlite", "") == before
    assert _stable(out) == _stable(out2)
    # compare reads the labels
    assert main(["compare", str(out), "--format", "json", "--out", str(tmp_path / "c.json")]) == 0
    rows = json.loads((tmp_path / "c.json").read_text())
    assert [r["model"] for r in rows] == ["llama", "qwen"]


def test_kill_at_three_points_then_resume_gives_the_same_summary(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cfg = _config(tmp_path)
    ref = tmp_path / "ref"
    subprocess.run(TOOL + ["run", "--config", str(cfg), "-o", str(ref)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "killed"
    # 1: inside the first model's behavioural stage; 2: inside its latent stage;
    # 3: inside the second model's tamper stage
    kills = [("behave/", 1), ("latent/", 2), ("tamper-", 0)]
    store_ref = sqlite3.connect(ref / "store.sqlite")
    keys = [k for (k,) in store_ref.execute("SELECT key FROM results ORDER BY rowid")]
    store_ref.close()
    qwen_tamper = sum(1 for k in keys if k.startswith("tamper-") and "qwen" in k)
    first_tamper = sum(1 for k in keys if k.startswith("tamper-")) - qwen_tamper
    assert qwen_tamper >= 2
    kills[2] = ("tamper-", first_tamper + 1)
    killed = [_run_killed_at(cfg, out, p, n, env) for p, n in kills]
    assert all(killed), f"a kill point was never reached: {killed}"
    done = subprocess.run(TOOL + ["run", "--config", str(cfg), "-o", str(out)], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _stable(out) == _stable(ref)


@pytest.mark.parametrize("text, needle", [
    ("models: [{name: a, spec: 'tiny:llama'}]\nbogus: 1\n", "bogus: unknown key"),
    ("models: [{name: a, spec: 'tiny:llama'}]\nlimit: many\n", "limit"),
    ("models: [{name: a, spec: 'tiny:llama'}]\nstages: [behave, dance]\n", "stages"),
    ("models: [{name: a, spec: 'tiny:llama'}, {name: a, spec: 'tiny:qwen2'}]\n", "duplicate"),
    ("models: []\n", "models"),
    ("models: [{name: a}]\n", "spec"),
    ("stages: [tamper_control]\nmodel: 'tiny:llama'\n", "tamper_control needs tamper"),
])
def test_bad_audit_config_is_one_line_exit_2(tmp_path, capsys, text, needle):
    cfg = tmp_path / "a.yaml"
    cfg.write_text(text)
    assert main(["run", "--config", str(cfg), "-o", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "\n" not in err
    assert not (tmp_path / "r").exists()


def test_a_rebuilt_model_replaces_its_stale_summary_entry(tmp_path, capsys):
    """The weights at a named model's path change between two commands into one folder (a
    rebuilt zoo model): the summary holds one entry under that name, the new one, and says so;
    the other models' entries stay."""
    from latentaudit.models.tiny import tiny_model, tiny_tokenizer

    ckpt = tmp_path / "m"

    def save(seed):
        tiny_model("llama", seed=seed).save_pretrained(ckpt)
        tiny_tokenizer().save_pretrained(ckpt)

    save(0)
    cfg = {"models": [{"name": "m", "spec": str(ckpt)}, {"name": "q", "spec": "tiny:qwen2"}],
           "stages": ["behave"], "limit": 2, "progress": "none",
           "behave": {"max_new_tokens": 2}}
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "r"
    assert main(["run", "--config", str(path), "-o", str(out)]) == 0
    first = json.loads((out / "summary.json").read_text())["models"]
    save(1)
    capsys.readouterr()
    assert main(["run", "--config", str(path), "-o", str(out)]) == 0
    assert "left summary.json" in capsys.readouterr().err
    models = json.loads((out / "summary.json").read_text())["models"]
    assert [m["name"] for m in models] == ["m", "q"]
    assert models[0]["key"] != first[0]["key"] and models[1]["key"] == first[1]["key"]


def test_the_python_entry_point_gives_the_command_lines_summary(tmp_path, monkeypatch):
    """latentaudit.audit(config) is the `run` verb without the command line: the same summary
    for the same configuration (a dict, a file), and bad input is a UserError before any
    folder is made."""
    import latentaudit
    from latentaudit.errors import UserError

    monkeypatch.chdir(tmp_path)
    cfg = _config(tmp_path)
    assert main(["run", "--config", str(cfg), "-o", str(tmp_path / "cli")]) == 0
    data = yaml.safe_load(cfg.read_text())
    s = latentaudit.audit({**data, "output_dir": str(tmp_path / "api")})
    assert s.run_dir == str(tmp_path / "api")
    assert _stable(tmp_path / "api") == _stable(tmp_path / "cli")
    with pytest.raises(UserError, match="limit"):
        latentaudit.audit({**data, "limit": "many", "output_dir": str(tmp_path / "bad")})
    assert not (tmp_path / "bad").exists()


def test_every_audit_stage_name_is_a_stage():
    import typing

    from latentaudit.config import AuditStage
    from latentaudit.pipeline import STAGES

    assert list(STAGES) == list(typing.get_args(AuditStage))


def test_a_staged_folder_is_published_whole_or_not_at_all(tmp_path):
    from latentaudit.files import staged_dir

    out = tmp_path / "m"
    with pytest.raises(RuntimeError):
        with staged_dir(out) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("killed mid-write")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with staged_dir(out) as tmp:
        (tmp / "a").write_text("one")
    with staged_dir(out) as tmp:  # replaces
        (tmp / "b").write_text("two")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    with staged_dir(out, replace=False) as tmp:  # someone else's copy stays
        (tmp / "c").write_text("three")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_finished_audit_rerun_loads_no_model_and_a_resumed_one_scores_no_guard_again(
        tmp_path, monkeypatch, capsys):
    """A second run of a finished audit prints its summary without loading a model (each
    model's key is read from its files); a run resumed after its summary was lost replays the
    store, the coherence guard's calibration included, and recomputes nothing."""
    import latentaudit.pipeline as pipeline
    from latentaudit.judges.coherence import CoherenceGuard

    monkeypatch.chdir(tmp_path)
    cfg = _config(tmp_path, stages=["behave", "latent"])
    out = tmp_path / "run"
    assert main(["run", "--config", str(cfg), "-o", str(out)]) == 0
    ref, rows = _stable(out), _count(out / "store.sqlite", "")
    assert _count(out / "store.sqlite", "guard/") == 2  # one calibration per model

    def refuse(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(pipeline, "load_model", refuse)
    capsys.readouterr()
    assert main(["run", "--config", str(cfg), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("not reloaded") == 2 and _stable(out) == ref
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    (out / "summary.json").unlink()  # nothing says the models finished: they are replayed
    monkeypatch.setattr(CoherenceGuard, "_score", refuse)
    assert main(["run", "--config", str(cfg), "-o", str(out)]) == 0
    assert _stable(out) == ref and _count(out / "store.sqlite", "") == rows
    err = capsys.readouterr().err
    assert "not reloaded" not in err and "audit: 2/2 qwen" in err


def test_a_model_key_read_from_its_files_is_the_loaded_models(tmp_path):
    from latentaudit.models.loader import load_model
    from latentaudit.models.tiny import tiny_model, tiny_tokenizer
    from latentaudit.runs import keys

    ckpt = tmp_path / "m"
    tiny_model("llama").save_pretrained(ckpt)
    tiny_tokenizer().save_pretrained(ckpt)
    for spec in ("tiny:qwen2", str(ckpt)):
        assert keys.spec_model_key(spec, "float32", "cpu") == keys.model_key(
            load_model(spec, "cpu", "float32"))
    assert keys.spec_model_key(spec, "bfloat16", "cpu") != keys.spec_model_key(spec, "float32", "cpu")
    assert keys.spec_model_key(str(tmp_path / "nothing"), "float32", "cpu") is None
    assert keys.spec_model_key("owner/some-hub-model", "float32", "cpu") is None


def test_a_model_finished_under_other_settings_is_audited_again(tmp_path, monkeypatch, capsys):
    """The folder's summary holds a finished entry computed with --limit 2; the same audit with
    --limit 3 into that folder is not skipped (the entry's settings differ), and an entry whose
    stages came from two settings is never taken as finished."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    for limit, skipped in ((2, 0), (3, 0), (3, 1)):
        cfg = _config(tmp_path, stages=["behave"], limit=limit,
                      models=[{"name": "llama", "spec": "tiny:llama"}])
        capsys.readouterr()
        assert main(["run", "--config", str(cfg), "-o", str(out)]) == 0
        assert capsys.readouterr().err.count("not reloaded") == skipped, limit
    s = json.loads((out / "summary.json").read_text())
    assert s["models"][0]["behave"]["S"]["n"] == 3
    cfg = _config(tmp_path, stages=["latent"], limit=3, seed=8,
                  models=[{"name": "llama", "spec": "tiny:llama"}])
    assert main(["run", "--config", str(cfg), "-o", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["models"][0]["settings"] is None


def test_a_summary_without_settings_is_replayed_once_then_skipped(tmp_path, monkeypatch, capsys):
    """A folder written before entries recorded their settings (or with mixed ones): the next
    run replays it from the store and records them, the one after skips it."""
    monkeypatch.chdir(tmp_path)
    cfg = _config(tmp_path, stages=["behave", "latent"])
    out = tmp_path / "run"
    assert main(["run", "--config", str(cfg), "-o", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    for m in s["models"]:
        m["settings"] = None
    (out / "summary.json").write_text(json.dumps(s))
    for skipped in (0, 2):
        capsys.readouterr()
        assert main(["run", "--config", str(cfg), "-o", str(out)]) == 0
        assert capsys.readouterr().err.count("not reloaded") == skipped
