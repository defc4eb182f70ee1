"""Where a model comes from, checked before it loads: pickle weights and a model's own code are
refused unless asked for (--allow-pickle, --trust-remote-code), in the audited model and in the
model-backed judges alike; a hub id is read from the local cache when it is there, and an
unreachable hub is one line at once. Every refusal: one stderr line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from latentaudit.cli import main
from latentaudit.errors import UserError
from latentaudit.judges.base import JudgeOptions
from latentaudit.judges.classifier import YesNoClassifierJudge
from latentaudit.models.loader import check_folder, hub_unreachable, load_model
from latentaudit.models.tiny import tiny_model, tiny_tokenizer

X = torch.tensor([[5, 6, 7, 8]])
COMMIT = "0123456789abcdef0123456789abcdef01234567"
MODELING = '''from transformers import LlamaForCausalLM


class XForCausalLM(LlamaForCausalLM):
    marker = "custom code ran"
'''


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits


def _save(folder: Path, seed: int = 0, pickle: bool = False) -> Path:
    """A tiny llama with its tokenizer; ``pickle``: its weights as pytorch_model.bin only
    (transformers 5 always writes safetensors, so the .bin is written with torch.save)."""
    model = tiny_model("llama", seed=seed)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    if pickle:
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def _auto_map(folder: Path, file: str = "config.json") -> Path:
    cfg = json.loads((folder / file).read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (folder / file).write_text(json.dumps(cfg))
    (folder / "modeling_x.py").write_text(MODELING)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    out = {"safe": _save(root / "safe"), "pickle": _save(root / "pickle", pickle=True),
           "auto_map": _auto_map(_save(root / "auto_map"))}
    out["tok_auto_map"] = _save(root / "tok_auto_map")
    cfg = json.loads((out["tok_auto_map"] / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}
    (out["tok_auto_map"] / "tokenizer_config.json").write_text(json.dumps(cfg))
    out["py_only"] = _save(root / "py_only")
    (out["py_only"] / "convert.py").write_text("print('a script beside the weights')\n")
    # safetensors beside a "pickle" that would fail if it were ever read
    out["both"] = _save(root / "both")
    (out["both"] / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    return out


@pytest.fixture
def closed_port() -> int:
    """A localhost port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def hub(monkeypatch, tmp_path, closed_port) -> Path:
    """An empty local hub cache, no offline flag, no proxy, and a hub endpoint that refuses
    connections: nothing here can reach the network."""
    import huggingface_hub.constants as c

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "ENDPOINT", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "http_proxy", "HTTP_PROXY",
              "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)
    return cache


def _cache(cache: Path, hub_id: str, src: Path, keep: tuple[str, ...] | None = None) -> Path:
    """Lay ``src``'s files out as the hub library caches ``hub_id`` at main (plain copies where
    it keeps symlinks to blobs); ``keep``: only those files."""
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for f in src.iterdir():
        if keep is None or f.name in keep:
            shutil.copy(f, snap / f.name)
    return snap


def _refused(capsys, tmp_path, model: str, *flags: str) -> str:
    """Run behave on ``model``; assert exit 2, one stderr line, no run folder; return the line."""
    out = tmp_path / "run"
    rc = main(["behave", "--model", model, "--harmful", "builtin:harmful:test",
               "--harmless", "builtin:borderline:test", "--limit", "1", "--max-new-tokens", "1",
               "--device", "cpu", "--progress", "none", "-o", str(out), *flags])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert not out.exists()
    return lines[0]


# ---- local folders ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind, needles", [
    ("pickle", ("pytorch_model.bin", "no safetensors", "arbitrary code", "--allow-pickle")),
    ("auto_map", ("auto_map in config.json", "--trust-remote-code")),
    ("tok_auto_map", ("auto_map in tokenizer_config.json", "--trust-remote-code")),
    ("py_only", ("convert.py", "--trust-remote-code")),
])
def test_refused_folders_are_one_line(capsys, tmp_path, folders, kind, needles):
    line = _refused(capsys, tmp_path, str(folders[kind]))
    assert str(folders[kind]) in line
    for n in needles:
        assert n in line, line


def test_the_other_flag_does_not_unlock(capsys, tmp_path, folders):
    """--trust-remote-code does not allow pickle weights, nor --allow-pickle a model's code."""
    assert "--allow-pickle" in _refused(capsys, tmp_path, str(folders["pickle"]),
                                        "--trust-remote-code")
    assert "--trust-remote-code" in _refused(capsys, tmp_path, str(folders["auto_map"]),
                                             "--allow-pickle")


def test_allow_pickle_loads_the_pickled_weights(folders):
    ref = _logits(tiny_model("llama", seed=0))
    lm = load_model(str(folders["pickle"]), device="cpu", allow_pickle=True)
    assert torch.allclose(_logits(lm.model), ref, atol=1e-6)
    with pytest.raises(UserError, match="pickle weights"):
        load_model(str(folders["pickle"]), device="cpu")


def test_allow_pickle_reaches_the_stages_and_the_judge(capsys, tmp_path, folders):
    """The flag on the command line reaches the audited model's loader and the judge's."""
    out = tmp_path / "run"
    rc = main(["behave", "--model", str(folders["pickle"]), "--allow-pickle",
               "--judge", f"classifier:{folders['pickle']}",
               "--harmful", "builtin:harmful:test", "--harmless", "builtin:borderline:test",
               "--limit", "1", "--max-new-tokens", "1", "--device", "cpu", "--progress", "none",
               "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert (out / "summary.json").is_file()


def test_safetensors_beside_a_pickle_never_reads_the_pickle(folders):
    """The .bin here is not a pickle: reading it would fail. Both with and without
    --allow-pickle the safetensors weights load."""
    ref = _logits(tiny_model("llama", seed=0))
    for allow in (False, True):
        lm = load_model(str(folders["both"]), device="cpu", allow_pickle=allow)
        assert torch.allclose(_logits(lm.model), ref, atol=1e-6)


def test_trust_remote_code_loads_a_script_folder(folders):
    lm = load_model(str(folders["py_only"]), device="cpu", trust_remote_code=True)
    assert torch.allclose(_logits(lm.model), _logits(tiny_model("llama", seed=0)), atol=1e-6)


def test_trust_remote_code_runs_the_folders_own_class(folders, tmp_path):
    """auto_map with --trust-remote-code: the folder's own class is what loads. In a child
    process, so that transformers' module cache is a temporary folder."""
    code = ("from latentaudit.models.loader import load_model\n"
            f"lm = load_model({str(folders['auto_map'])!r}, device='cpu', trust_remote_code=True)\n"
            "print(type(lm.model).__name__, '|', lm.model.marker)\n")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "XForCausalLM | custom code ran"


def test_check_folder_answers_use_safetensors(folders):
    assert check_folder(folders["safe"], "x", False, False) is True
    assert check_folder(folders["both"], "x", False, False) is True
    assert check_folder(folders["pickle"], "x", True, False) is False
    assert check_folder(folders["py_only"], "x", False, True) is True


# ---- hub ids ---------------------------------------------------------------------------------

def test_unreachable_hub_is_one_line_at_once(capsys, tmp_path, hub, closed_port):
    t0 = time.monotonic()
    line = _refused(capsys, tmp_path, "someone/some-model")
    assert time.monotonic() - t0 < 10
    for n in ("someone/some-model", f"cannot reach 127.0.0.1:{closed_port}", "refused",
              "pass its folder", "HF_HUB_OFFLINE=1"):
        assert n in line, line


def test_offline_flag_and_no_cache_is_one_line(capsys, tmp_path, hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = _refused(capsys, tmp_path, "someone/some-model@v2")
    assert "cannot load hub model 'someone/some-model'" in line and "HF_HUB_OFFLINE" in line


def test_probe_sees_a_listening_endpoint(hub, monkeypatch):
    import huggingface_hub.constants as c

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        monkeypatch.setattr(c, "ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")
        assert hub_unreachable() is None
    assert "refused" in hub_unreachable().lower()


def test_cached_hub_model_loads_without_the_network(hub, folders):
    """In the local cache: read from there, the (closed) endpoint never asked."""
    _cache(hub, "someone/cached-model", folders["safe"])
    ref = _logits(tiny_model("llama", seed=0))
    for spec in ("someone/cached-model", "someone/cached-model@main", f"someone/cached-model@{COMMIT}"):
        lm = load_model(spec, device="cpu")
        assert lm.info["source"] == "hub" and lm.info["cached"] is True
        assert lm.info["commit"] == COMMIT and lm.spec == "someone/cached-model"
        assert torch.allclose(_logits(lm.model), ref, atol=1e-6)
    with pytest.raises(UserError, match="cannot reach"):  # another revision is not cached
        load_model("someone/cached-model@v9", device="cpu")


@pytest.mark.parametrize("kind, needle", [("pickle", "--allow-pickle"),
                                          ("auto_map", "--trust-remote-code")])
def test_cached_hub_model_is_checked_like_a_folder(capsys, tmp_path, hub, folders, kind, needle):
    _cache(hub, f"someone/{kind}", folders[kind])
    line = _refused(capsys, tmp_path, f"someone/{kind}")
    assert f"hub model 'someone/{kind}'" in line and needle in line


def test_cached_pickle_hub_model_loads_when_allowed(hub, folders):
    _cache(hub, "someone/pickled", folders["pickle"])
    lm = load_model("someone/pickled", device="cpu", allow_pickle=True)
    assert torch.allclose(_logits(lm.model), _logits(tiny_model("llama", seed=0)), atol=1e-6)


def test_incomplete_cache_then_unreachable_hub(capsys, tmp_path, hub, folders):
    """config.json cached but no weights: the hub is asked, and cannot be reached."""
    _cache(hub, "someone/half", folders["safe"], keep=("config.json",))
    assert "cannot reach" in _refused(capsys, tmp_path, "someone/half")
    # weights cached but no tokenizer: the cached copy fails to load, then the probe says why
    _cache(hub, "someone/notok", folders["safe"], keep=("config.json", "model.safetensors"))
    with pytest.raises(UserError, match="cannot reach"):
        load_model("someone/notok", device="cpu")


# ---- the model-backed judges -----------------------------------------------------------------

def _judge(target, **extra) -> YesNoClassifierJudge:
    return YesNoClassifierJudge(target=str(target),
                                options=JudgeOptions(device="cpu", dtype="auto", extra=extra))


@pytest.mark.parametrize("kind, flag, needle", [("pickle", "allow_pickle", "--allow-pickle"),
                                                ("auto_map", "trust_remote_code", "--trust-remote-code"),
                                                ("py_only", "trust_remote_code", "--trust-remote-code")])
def test_judges_apply_the_same_checks(folders, kind, flag, needle):
    j = _judge(folders[kind])
    with pytest.raises(UserError, match=needle) as e:
        j.load()
    assert str(e.value).startswith("classifier judge: ") and j.model is None
    if kind != "auto_map":  # its own class needs a module cache (see the test above)
        ok = _judge(folders[kind], **{flag: True})
        ok.load()
        assert ok.model is not None


def test_judge_on_an_unreachable_hub_is_quick(hub):
    t0 = time.monotonic()
    with pytest.raises(UserError, match="classifier judge: cannot load hub model 'someone/judge'"):
        _judge("someone/judge").load()
    assert time.monotonic() - t0 < 10


def test_judge_verb_refuses_a_pickle_judge(capsys, tmp_path, folders):
    inp = tmp_path / "rows.csv"
    inp.write_text("prompt,response\nq,a\n")
    out = tmp_path / "verdicts.jsonl"
    rc = main(["judge", "--input", str(inp), "--out", str(out), "--judge-device", "cpu",
               "--judge", f"classifier:{folders['pickle']}"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--allow-pickle" in err
    assert not out.exists()
