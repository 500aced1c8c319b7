"""Shared fixtures: a hermetic model cache per test session and the trained demo model."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory):
    """Zoo weights are trained once per session into a fresh cache: tests never depend on a
    developer's ~/.cache."""
    path = tmp_path_factory.mktemp("ldam-cache")
    old = os.environ.get("LDAM_SWEEP_CACHE")
    os.environ["LDAM_SWEEP_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LDAM_SWEEP_CACHE", None)
    else:
        os.environ["LDAM_SWEEP_CACHE"] = old


@pytest.fixture(scope="session")
def digits_model(model_cache):
    import ldam_sweep as ls

    return ls.load_model("digits-cnn", device="cpu")


@pytest.fixture(scope="session")
def real_max_logits(digits_model):
    from ldam_sweep.model.zoo import class_max_logits

    return class_max_logits(digits_model.net)
