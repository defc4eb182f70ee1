"""`latentaudit run --executor ray`: the audit's units on workers, the run folder written by the
driver alone. The unit path is checked in this process (no cluster) and on a local Ray cluster
of 2 workers started by the test: the same summary.json as the local executor, a worker killed
mid-unit, a driver killed and rerun."""

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

from latentaudit.cli import main
from latentaudit.data.sets import load_prompt_set
from latentaudit.executor import ray_backend
from latentaudit.executor.driver import SerialBackend
from latentaudit.executor.units import plan
from latentaudit.runs.summary import stable_view
from latentaudit.stages.latent import prompt_chunk
from test_run import _config as run_config

TOOL = [sys.executable, "-c", "import sys; from latentaudit.cli import main; sys.exit(main())"]
N_UNITS = 8  # per model: latent_prep, 2 chunks × pgd, 2 chunks × noise, tamper, behave, summary


def _config(tmp_path: Path) -> Path:
    # test_run's audit, with 4 prompts in 2 chunks and two layers, so each chunk's sweep
    # warm-starts the second layer from the first
    return run_config(tmp_path, limit=4, executor={"chunk": 2, "workers": 2}, latent={
        "layers": "0,1", "families": ["pgd", "noise"],
        "family_params": {"pgd": {"steps": 2}, "noise": {"draws": 1}},
        "max_new_tokens": 6, "calibration_n": 4})


def _stable(run_dir: Path) -> dict:
    return stable_view(json.loads((run_dir / "summary.json").read_text()))


def _markers(db: Path) -> list[str]:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.2)
        try:
            return [k for (k,) in con.execute("SELECT key FROM results WHERE key LIKE 'executor/%'")]
        finally:
            con.close()
    except sqlite3.Error:
        return []


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """The audit config and its run on the local executor (this process, one thread, as the
    workers run)."""
    import torch

    tmp = tmp_path_factory.mktemp("executor")
    cfg = _config(tmp)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a module fixture runs before the per-test one that sets this
    try:
        assert main(["run", "--config", str(cfg), "-o", str(tmp / "local")]) == 0
    finally:
        torch.set_num_threads(threads)
    return cfg, tmp / "local"


def test_the_plan_chunks_every_family_and_ends_each_model_with_its_summary():
    units = plan(["a", "b"], ["behave", "latent", "tamper"], [5, 1], ["pgd", "steer"], 2)
    ids = [u.id for u in units]
    assert ids.count("a/summary") == 1 and ids[-1] == "b/summary"
    assert [u.id for u in units if u.kind == "latent" and u.name == "a"] == [
        "a/latent/pgd/1of3", "a/latent/pgd/2of3", "a/latent/pgd/3of3",
        "a/latent/steer/1of3", "a/latent/steer/2of3", "a/latent/steer/3of3"]
    assert [u.id for u in units if u.kind == "latent" and u.name == "b"] == [
        "b/latent/pgd/1of1", "b/latent/steer/1of1"]
    by = {u.id: u for u in units}
    assert all(by[u].deps == ("a/latent_prep",) for u in ids if u.startswith("a/latent/"))
    assert set(by["a/summary"].deps) == {i for i in ids if i.startswith("a/") and i != "a/summary"}
    assert by["a/tamper"].stages(["behave", "latent", "tamper", "tamper_control"]) == [
        "tamper", "tamper_control"]
    assert plan(["a"], ["directions"], [0], ["pgd"], 2)[0].stages(["directions"]) == ["directions"]
    # no latent stage: no latent units
    assert [u.kind for u in plan(["a"], ["behave"], [0], ["pgd"], 2)] == ["behave", "summary"]


@pytest.mark.parametrize("n", [1, 2, 5, 16, 17])
def test_prompt_chunks_cover_the_set_once_in_order(n):
    ps = load_prompt_set("builtin:harmful:test", limit=n)
    for k in range(1, n + 1):
        parts = [prompt_chunk(ps, i, k) for i in range(k)]
        assert [p.id for c in parts for p in c.prompts] == [p.id for p in ps.prompts]
        assert all(len(c) >= 1 for c in parts)


def test_units_in_this_process_give_the_local_summary_and_resume(reference, tmp_path,
                                                                  monkeypatch, capsys):
    cfg, local = reference
    monkeypatch.setattr(ray_backend.RayBackend, "check", staticmethod(lambda ex: SerialBackend))
    out = tmp_path / "units"
    assert main(["run", "--config", str(cfg), "-o", str(out), "--executor", "ray"]) == 0
    assert _stable(out) == _stable(local)
    assert len(_markers(out / "store.sqlite")) == 2 * N_UNITS  # each unit once
    capsys.readouterr()
    # a rerun schedules only the summaries: everything else is in the store
    assert main(["run", "--config", str(cfg), "-o", str(out), "--executor", "ray"]) == 0
    err = capsys.readouterr().err
    assert f"2 of {2 * N_UNITS} units to run" in err and f"({2 * (N_UNITS - 1)} already" in err
    assert _stable(out) == _stable(local)
    # and the local executor resumes the same folder (the executor is not the run's identity)
    assert main(["run", "--config", str(cfg), "-o", str(out)]) == 0
    assert _stable(out) == _stable(local)


def test_executor_ray_without_ray_is_one_line_and_no_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    cfg = _config(tmp_path)
    assert main(["run", "--config", str(cfg), "-o", str(tmp_path / "r"), "--executor", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "latentaudit[ray]" in err and "\n" not in err
    assert not (tmp_path / "r").exists()


def _needs_ray():
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'latentaudit[ray]')")


def _env(**extra) -> dict:
    # one thread per worker, as the test's own process: the same float sums, the same summary
    return {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", **extra}


@pytest.mark.slow
def test_ray_two_workers_give_the_local_summary_despite_a_killed_worker(reference, tmp_path):
    _needs_ray()
    cfg, local = reference
    out = tmp_path / "ray"
    env = _env(LATENTAUDIT_FAULT_KILL_UNIT="qwen/latent/pgd/1of2",
               LATENTAUDIT_FAULT_KILL_ONCE=str(tmp_path / "killed-once"))
    done = subprocess.run(TOOL + ["run", "--config", str(cfg), "-o", str(out), "--executor", "ray"],
                          env=env, capture_output=True, text=True, timeout=900,
                          start_new_session=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "killed-once").exists()  # the worker did die mid-unit
    assert "qwen/latent/pgd/1of2: worker lost" in done.stderr
    assert "2 workers" in done.stderr
    assert _stable(out) == _stable(local)
    markers = _markers(out / "store.sqlite")
    assert len(markers) == len(set(markers)) == 2 * N_UNITS


@pytest.mark.slow
def test_ray_driver_killed_then_rerun_resumes(reference, tmp_path):
    _needs_ray()
    cfg, local = reference
    out = tmp_path / "ray"
    cmd = TOOL + ["run", "--config", str(cfg), "-o", str(out), "--executor", "ray"]
    # its own session: killing the group takes the driver and the cluster it started
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    killed = False
    while proc.poll() is None and time.time() < deadline:
        if len(_markers(out / "store.sqlite")) >= 4:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    proc.wait()
    assert killed, "the run finished (or hung) before four units were stored"
    n_before = len(_markers(out / "store.sqlite"))
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900,
                          start_new_session=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"({n_before} already in the store)" in done.stderr
    assert _stable(out) == _stable(local)
