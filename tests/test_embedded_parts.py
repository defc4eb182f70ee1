"""Embedded models found through package metadata; a model shipped in parts is joined into the
cache only when the joined file matches its pinned size and sha256."""

import hashlib
from pathlib import Path

import pytest

from latentaudit.errors import UserError
from latentaudit.models import embedded
from latentaudit.models.embedded import EmbeddedModel, find_embedded_gguf, is_installed


def _fake_dist(site: Path, name: str, rel: str, data: bytes) -> None:
    """A minimal installed distribution: a dist-info whose RECORD lists one data file."""
    f = site / rel
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(data)
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "RECORD").write_text(f"{rel},,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")


@pytest.fixture
def parted(tmp_path, monkeypatch):
    """An embedded model in three fake packages (parts in order), with its pinned hash."""
    site = tmp_path / "site"
    chunks = [b"GGUF" + bytes(range(200)) * 3, bytes(500), b"tail" * 37]
    for i, c in enumerate(chunks, 1):
        _fake_dist(site, f"fakemodel-part{i}", f"fakemodel_part{i}/data/part0{i}.bin", c)
    monkeypatch.syspath_prepend(str(site))
    joined = b"".join(chunks)
    em = EmbeddedModel("fake", tuple(f"fakemodel-part{i}" for i in (1, 2, 3)), "*/data/part*.bin",
                       "pip install fakemodel", "a fake", hashlib.sha256(joined).hexdigest(),
                       len(joined))
    monkeypatch.setitem(embedded.EMBEDDED, "fake", em)
    monkeypatch.setenv("LATENTAUDIT_CACHE", str(tmp_path / "cache"))
    return site, joined, em


def test_parts_join_in_order_once(parted, tmp_path):
    site, joined, em = parted
    assert is_installed("fake")
    out = find_embedded_gguf("fake")
    assert out.read_bytes() == joined and out.parent == tmp_path / "cache" / "gguf"
    mtime = out.stat().st_mtime_ns
    assert find_embedded_gguf("fake") == out and out.stat().st_mtime_ns == mtime  # not rejoined
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary left behind


def test_join_remembers_its_hash(parted, monkeypatch):
    """The join hashed the file as it wrote it: the loader's hash of it is read from the memo."""
    site, joined, em = parted
    out = find_embedded_gguf("fake")
    monkeypatch.setattr(embedded, "file_sha256", lambda p: pytest.fail("hashed again"))
    assert embedded.file_sha256_cached(out) == em.sha256


def test_tampered_part_is_refused_and_nothing_cached(parted, tmp_path):
    site, joined, em = parted
    part = site / "fakemodel_part2/data/part02.bin"
    part.write_bytes(b"\x01" + part.read_bytes()[1:])
    with pytest.raises(UserError, match="do not match the pinned file.*nothing was cached"):
        find_embedded_gguf("fake")
    assert not any((tmp_path / "cache" / "gguf").iterdir())


def test_missing_part_names_the_install_command(parted):
    site, joined, em = parted
    for f in (site / "fakemodel_part3-1.0.dist-info").iterdir():
        f.unlink()
    (site / "fakemodel_part3-1.0.dist-info").rmdir()
    assert not is_installed("fake")
    with pytest.raises(UserError, match="not installed: run `pip install fakemodel`"):
        find_embedded_gguf("fake")


def test_single_file_model_is_checked_against_its_pin(tmp_path, monkeypatch):
    data = b"GGUF" + bytes(64)
    _fake_dist(tmp_path / "site", "onefile", "onefile/model.gguf", data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("LATENTAUDIT_CACHE", str(tmp_path / "cache"))
    good = EmbeddedModel("one", ("onefile",), "*.gguf", "pip install onefile", "x",
                         hashlib.sha256(data).hexdigest(), len(data))
    monkeypatch.setitem(embedded.EMBEDDED, "one", good)
    assert find_embedded_gguf("one") == tmp_path / "site" / "onefile" / "model.gguf"
    monkeypatch.setitem(embedded.EMBEDDED, "one", EmbeddedModel(
        "one", ("onefile",), "*.gguf", "pip install onefile", "x", "0" * 64, len(data)))
    with pytest.raises(UserError, match="does not match the pinned file"):
        find_embedded_gguf("one")


def test_cli_ls_models_says_what_is_installed(parted):
    from typer.testing import CliRunner

    from latentaudit.cli import app

    out = CliRunner().invoke(app, ["ls", "models"]).output
    assert "embedded:fake" in out and "[installed]" in out
    assert "embedded:qwen2.5-coder-0.5b" in out
