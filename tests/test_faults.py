"""Run folders under two writers, kills and disk faults: a second writer is refused with one
line while the first holds the folder; a killed run leaves no stale lock and resumes to the
uninterrupted result; a read-only folder or a full disk is one line, with nothing half-written
(the store keeps whole batches, summary.json stays the old complete file or the new one)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from latentaudit.cli import main
from latentaudit.errors import UserError
from latentaudit.files import DiskFault, write_json
from latentaudit.runs.run import LOCK_NAME, check_run_folder, open_run
from latentaudit.runs.store import ResultStore
from latentaudit.runs.summary import Summary, stable_view

TOOL = [sys.executable, "-m", "latentaudit.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
BEHAVE = ["behave", "--model", "tiny:llama", "--progress", "none", "--device", "cpu",
          "--max-new-tokens", "3"]


def _one_error_line(err: str) -> str:
    """The error line of a failed command's stderr; asserts it is the only one and that no
    traceback came with it."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    return errors[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a folder but the lock's record (bookkeeping a writer rewrites)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != LOCK_NAME}


def _audit_config(tmp: Path, limit: int = 4) -> Path:
    """Two tiny models through behave and latent with tiny settings (a few seconds)."""
    cfg = {
        "models": [{"name": "llama", "spec": "tiny:llama"}, {"name": "qwen", "spec": "tiny:qwen2"}],
        "stages": ["behave", "latent"], "limit": limit, "progress": "none", "seed": 5,
        "batch_size": 2, "device": "cpu",
        "behave": {"max_new_tokens": 6},
        "latent": {"layers": "1", "families": ["pgd", "noise"],
                   "family_params": {"pgd": {"steps": 2}, "noise": {"draws": 1}},
                   "max_new_tokens": 6, "calibration_n": 4},
    }
    path = tmp / "audit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _ro_con(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)


def _count(db: Path) -> int:
    try:
        con = _ro_con(db)
        try:
            return con.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return -1


def _keys(db: Path) -> set[str]:
    con = _ro_con(db)
    try:
        return {k for (k,) in con.execute("SELECT key FROM results")}
    finally:
        con.close()


def _check_whole(folder: Path) -> None:
    """Nothing half-written: the store is intact, holds each key once and only payloads that
    parse; summary.json, if there, is a complete summary."""
    db = folder / "store.sqlite"
    if db.exists():
        con = _ro_con(db)
        try:
            assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert con.execute("SELECT key FROM results GROUP BY key HAVING COUNT(*) > 1"
                               ).fetchall() == []
            for key, payload in con.execute("SELECT key, payload FROM results"):
                assert isinstance(json.loads(payload), dict), key
        finally:
            con.close()
    summary = folder / "summary.json"
    if summary.exists():
        Summary.model_validate_json(summary.read_text())


def _stable(folder: Path) -> dict:
    return stable_view(json.loads((folder / "summary.json").read_text()))


@contextlib.contextmanager
def _child(args: list[str]) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(TOOL + args, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()  # SIGKILL also ends a stopped process
        proc.wait()


def _wait_for_holder(folder: Path, pid: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError, ValueError):
            if json.loads((folder / LOCK_NAME).read_text())["pid"] == pid:
                return
        time.sleep(0.01)
    pytest.fail(f"the command never took {folder} (exit {proc.poll()})")


# -- two writers -------------------------------------------------------------------------------

def test_a_run_folder_is_held_until_close_and_released_on_an_exception(tmp_path):
    out, cfg = tmp_path / "r", {"model": "tiny:llama"}
    with open_run(str(out), cfg, "tiny:llama", command="latentaudit behave -o r") as run:
        assert run.lock.held
        with pytest.raises(UserError) as e:
            open_run(str(out), cfg, "tiny:llama")
        msg = str(e.value)
        assert msg.startswith(f"run folder {out} is in use") and "\n" not in msg
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in msg
        assert "(latentaudit behave -o r)" in msg
        with pytest.raises(UserError, match="in use"):  # the probe before a model loads
            check_run_folder(str(out), cfg, "tiny:llama")
        run.store.put("k", "s", {"v": 1})  # the holder itself still writes
    with pytest.raises(RuntimeError):
        with open_run(str(out), cfg, "tiny:llama") as run:
            raise RuntimeError("a stage failed")
    with open_run(str(out), cfg, "tiny:llama") as run:  # released both times
        assert run.resumed and run.store.get("k") == {"v": 1}


def test_two_fresh_folders_in_one_second_are_two_folders(tmp_path, monkeypatch):
    """Without --output-dir: two commands started in the same second with different configs
    write into two folders; one with the same config finds the first one's folder (the one to
    resume) and is refused while it is held."""
    import latentaudit.runs.run as run_mod

    monkeypatch.setattr(run_mod.time, "strftime", lambda fmt, *a: "20250101-000000")
    a = open_run(None, {"model": "tiny:llama", "limit": 1}, "tiny:llama", root=tmp_path)
    b = open_run(None, {"model": "tiny:llama", "limit": 2}, "tiny:llama", root=tmp_path)
    try:
        assert (a.dir.name, b.dir.name) == ("20250101-000000-tiny-llama",
                                            "20250101-000000-2-tiny-llama")
        with pytest.raises(UserError, match=f"{a.dir} is in use"):
            open_run(None, {"model": "tiny:llama", "limit": 1}, "tiny:llama", root=tmp_path)
    finally:
        a.close()
        b.close()
    # each is found again by its own configuration (a rerun resumes it)
    with open_run(None, {"model": "tiny:llama", "limit": 2}, "tiny:llama", root=tmp_path) as c:
        assert c.dir == b.dir and c.resumed


def test_a_second_writer_is_refused_and_takes_over_after_a_kill(tmp_path, capsys):
    """Real processes: one command holds the folder (stopped right after it took it); a second
    `behave` and a `run` into it are refused with one line naming the holder, and write
    nothing; report and compare read it meanwhile; after kill -9 the next command takes the
    folder and resumes."""
    out = tmp_path / "r"
    assert main(BEHAVE + ["--limit", "2", "-o", str(out)]) == 0  # a finished run to resume
    capsys.readouterr()
    with _child(BEHAVE + ["--limit", "6", "-o", str(out)]) as holder:
        _wait_for_holder(out, holder.pid, holder)
        holder.send_signal(signal.SIGSTOP)  # holds the lock for as long as the test needs
        before = _snapshot(out)
        second = subprocess.run(TOOL + BEHAVE + ["--limit", "6", "-o", str(out)], env=ENV,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        line = second.stderr.strip()
        assert "\n" not in line and line.startswith(f"error: run folder {out} is in use")
        assert f"pid {holder.pid} on host {socket.gethostname()} since " in line
        assert "behave" in line and "--limit 6" in line
        # `latentaudit run` (several models, one lock) is refused the same way, in-process
        cfg = _audit_config(tmp_path)
        assert main(["run", "--config", str(cfg), "-o", str(out)]) == 2
        assert _one_error_line(capsys.readouterr().err).startswith(f"error: run folder {out}")
        assert _snapshot(out) == before  # the refused commands wrote nothing
        # readers take no lock
        assert main(["compare", str(out), "--format", "json", "--out", str(tmp_path / "c.json")]) == 0
        assert json.loads((tmp_path / "c.json").read_text())
        assert main(["report", str(out), "--out", str(tmp_path / "r.html")]) == 0
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    capsys.readouterr()
    # the kernel dropped the dead holder's lock: the next command takes the folder and resumes
    assert main(BEHAVE + ["--limit", "6", "-o", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["provenance"]["resumed"] is True and s["models"][0]["behave"]["S"]["n"] == 6
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not list(out.glob(".*.tmp-*"))  # a temporary the kill may have left is gone
    _check_whole(out)


# -- kills at random points --------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """(audit config, its uninterrupted run folder), run as the faulted runs are: a process."""
    tmp = tmp_path_factory.mktemp("faults-ref")
    cfg = _audit_config(tmp)
    ref = tmp / "ref"
    subprocess.run(TOOL + ["run", "--config", str(cfg), "-o", str(ref)], env=ENV, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    return cfg, ref


def _run_killed_at(cfg: Path, out: Path, rows: int, delay: float) -> bool:
    """Starts the audit and SIGKILLs it `delay` seconds after its store holds `rows` rows;
    returns False if it finished first."""
    db = out / "store.sqlite"
    with _child(["run", "--config", str(cfg), "-o", str(out)]) as proc:
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if db.exists() and _count(db) >= rows:
                time.sleep(delay)
                if proc.poll() is not None:
                    return False
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.005)
    return False


@pytest.mark.slow
def test_killed_at_random_points_a_run_resumes_to_the_uninterrupted_summary(tmp_path, reference):
    cfg, ref = reference
    total = _count(ref / "store.sqlite")
    assert total > 20
    rng = random.Random(1234)
    # where to kill: after a random number of committed rows, plus a random pause so the kill
    # lands anywhere between two commits (a summary write, the next model's load...)
    points = sorted(rng.sample(range(total), 5))
    out = tmp_path / "killed"
    killed = 0
    for rows in points:
        killed += _run_killed_at(cfg, out, rows, rng.uniform(0.0, 0.15))
        _check_whole(out)
    assert killed >= 3, f"only {killed} of the kills landed before the run ended"
    done = subprocess.run(TOOL + ["run", "--config", str(cfg), "-o", str(out)], env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    _check_whole(out)
    assert _stable(out) == _stable(ref)
    assert _keys(out / "store.sqlite") == _keys(ref / "store.sqlite")  # nothing lost or extra
    assert not list(out.glob(".*.tmp-*"))


# -- disk faults -------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_disk_that_fills_mid_run_is_one_line_exit_1_and_the_rerun_resumes(tmp_path, reference):
    """A real fault: the run's file size limit (RLIMIT_FSIZE, as a quota would) stops the
    store's journal mid-run. Exit 1 (a fault, not bad input), one line; every committed batch
    is whole; the same command without the limit resumes to the uninterrupted summary."""
    cfg, ref = reference
    out = tmp_path / "full"

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))

    full = subprocess.run(TOOL + ["run", "--config", str(cfg), "-o", str(out)], env=ENV,
                          capture_output=True, text=True, timeout=600, preexec_fn=small_disk)
    assert full.returncode == 1, full.stderr[-2000:]
    line = _one_error_line(full.stderr)
    assert f"run store {out / 'store.sqlite'}" in line and "rerun the same command" in line
    _check_whole(out)
    assert 0 < _count(out / "store.sqlite") < _count(ref / "store.sqlite")
    assert not list(out.glob(".*.tmp-*"))
    done = subprocess.run(TOOL + ["run", "--config", str(cfg), "-o", str(out)], env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _stable(out) == _stable(ref)
    assert _keys(out / "store.sqlite") == _keys(ref / "store.sqlite")


def test_a_batch_that_fills_the_store_is_rolled_back_whole(tmp_path):
    """put_many is one transaction: SQLite's own 'database or disk is full' (a page limit)
    in the middle of a batch leaves none of it; the store stays usable."""
    store = ResultStore(tmp_path / "s.sqlite")
    store.put_many((f"a/{i}", "s", {"i": i}) for i in range(5))
    pages = store._con.execute("PRAGMA page_count").fetchone()[0]
    store._con.execute(f"PRAGMA max_page_count={pages + 1}")  # room for a row or two, not 40
    batch = [(f"b/{i}", "s", {"i": i, "pad": "x" * 2000}) for i in range(40)]
    with pytest.raises(DiskFault) as e:
        store.put_many(batch)
    assert e.value.exit_code == 1 and "disk is full" in str(e.value) and "\n" not in str(e.value)
    assert store.count("b/") == 0 and store.count("a/") == 5
    store._con.execute("PRAGMA max_page_count=1073741823")
    store.put_many(batch)
    assert store.count("b/") == 40
    store.close()
    _check_whole(tmp_path)


def test_summary_json_is_the_old_file_or_the_new_one_when_the_disk_fills(tmp_path):
    """A real EFBIG (RLIMIT_FSIZE) while writing: the old file stays whole, no temporary is
    left, and the error is one line of DiskFault."""
    path = tmp_path / "summary.json"
    write_json(path, {"v": 1})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # Python ignores SIGXFSZ
    try:
        with pytest.raises(DiskFault) as e:
            write_json(path, {"v": "x" * 100_000})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert "File too large" in str(e.value) and "\n" not in str(e.value)
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 2}


def test_no_space_when_a_run_writes_its_files_is_exit_1_and_changes_nothing(tmp_path, capsys,
                                                                             monkeypatch):
    """ENOSPC where a full disk reports it on delayed allocation (fsync): exit 1, one line,
    the folder exactly as before and not left locked."""
    out = tmp_path / "r"
    assert main(BEHAVE + ["--limit", "2", "-o", str(out)]) == 0
    before = _snapshot(out)

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    capsys.readouterr()
    assert main(BEHAVE + ["--limit", "3", "-o", str(out)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and "rerun" in line
    assert _snapshot(out) == before
    monkeypatch.undo()
    assert main(BEHAVE + ["--limit", "3", "-o", str(out)]) == 0  # the lock was released


def test_a_store_that_is_not_sqlite_is_one_line_and_kept(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "store.sqlite").write_bytes(b"not a database, but someone's file" * 100)
    before = _snapshot(out)
    assert main(BEHAVE + ["--limit", "2", "-o", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"cannot open the run store {out / 'store.sqlite'}" in line and "not a database" in line
    assert _snapshot(out) == before


@contextlib.contextmanager
def _read_only(folder: Path) -> Iterator[None]:
    """``folder`` made read-only for this process: chmod 555, or for root (whom modes do not
    stop) the immutable attribute; skips where neither holds."""
    root = os.geteuid() == 0
    if root:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("running as root, where chmod does not stop writes, and chattr +i "
                        "is unavailable here")
    else:
        folder.chmod(0o555)
    try:
        probe = folder / ".probe"
        try:
            probe.write_text("x")
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.skip(f"{folder} stays writable after chmod/chattr on this file system")
        yield
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        else:
            folder.chmod(0o755)


def test_a_read_only_output_folder_is_one_line_exit_2_and_nothing_written(tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    done = parent / "done"
    assert main(BEHAVE + ["--limit", "2", "-o", str(done)]) == 0
    before = _snapshot(done)
    capsys.readouterr()
    # a new run folder under a read-only parent
    with _read_only(parent):
        assert main(BEHAVE + ["--limit", "2", "-o", str(parent / "new")]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert line.startswith(f"error: cannot create run folder {parent / 'new'}")
        assert sorted(p.name for p in parent.iterdir()) == ["done"]
    # resuming into a run folder that became read-only
    with _read_only(done):
        assert main(BEHAVE + ["--limit", "3", "-o", str(done)]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert str(done) in line and "store" in line
        assert _snapshot(done) == before
        # reading it still works
        assert main(["compare", str(done), "--format", "json",
                     "--out", str(tmp_path / "c.json")]) == 0
