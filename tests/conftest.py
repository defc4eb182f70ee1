"""Shared fixtures.

Unit tests run on tiny random models built offline (``latentaudit.models.tiny``); tests marked
``embedded`` use the real SmolLM2-135M-Instruct, loaded once per session into a session-private
cache (so the test of the GGUF conversion sees a cold cache, and no test touches the user's).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    env = os.environ.get("LATENTAUDIT_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed_and_threads(request):
    """Seed every test; tiny models run fastest (and steadiest) on one thread."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    embedded = request.node.get_closest_marker("embedded") is not None
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)) if embedded else 1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = shared_data_dir()
    if not d.is_dir():
        pytest.skip("../shared/data is absent")
    return d


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("latentaudit-cache")
    return cache


@pytest.fixture(scope="session")
def embedded_load(embedded_cache):
    """(first LoadedModel, seconds it took) — the first load in the session-private cache."""
    import time

    from latentaudit.models.loader import load_model
    from latentaudit.pipeline import quiet_libraries

    quiet_libraries()
    mp = pytest.MonkeyPatch()
    mp.setenv("LATENTAUDIT_CACHE", str(embedded_cache))
    t0 = time.time()
    lm = load_model("embedded:smollm2-135m", device="cpu")
    took = time.time() - t0
    yield lm, took
    mp.undo()


@pytest.fixture(scope="session")
def embedded_lm(embedded_load):
    return embedded_load[0]


@pytest.fixture(scope="session")
def tiny_lm():
    from latentaudit.models.loader import load_model

    return load_model("tiny:llama", device="cpu")


# `safe` of the real SmolLM2 as the demo gets it by default: assembled from the adapter and card
# of our build that the package ships (seconds), shared by the integration tests of the latent
# stage, the fine-tuning attack and the demo. That the shipped files are the recipe's own output
# is checked by test_a_fresh_build_retraces_the_shipped_safe (the first steps, every CI run) and
# test_a_fresh_build_reproduces_the_shipped_safe (all 40 steps, LATENTAUDIT_REBUILD=1).
@pytest.fixture(scope="session")
def embedded_safe(embedded_load, tmp_path_factory):
    from latentaudit.construct.build import assemble_shipped
    from latentaudit.models.loader import load_model

    out = tmp_path_factory.mktemp("zoo") / "safe"
    assert assemble_shipped("safe", "embedded:smollm2-135m", out, True, seed=0,
                            device="cpu") == out
    return load_model(str(out), device="cpu"), out
