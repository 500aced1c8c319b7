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


DEAD_CHANNEL = 2
DEAD_CHANNEL_SRC = f'''
from collections import OrderedDict
import torch
from torch import nn

DEAD = {DEAD_CHANNEL}


def build():
    """A conv layer whose channel DEAD has zero weights and bias -1: after the ReLU it is 0 with 0
    gradient for every image in [0, 1]. The other channels have positive weights: alive everywhere."""
    net = nn.Sequential(OrderedDict([("conv", nn.Conv2d(1, 4, 3, padding=1)), ("relu", nn.ReLU()),
                                     ("pool", nn.AdaptiveAvgPool2d(4)), ("flat", nn.Flatten()), ("fc", nn.Linear(64, 10))]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every weight from a fixed generator: the same model (fingerprint) in every process
        for p in net.parameters():
            p.copy_(torch.rand(p.shape, generator=g) - 0.5)
        net.conv.weight.copy_(torch.rand(net.conv.weight.shape, generator=g) * 0.5)
        net.conv.bias.zero_()
        net.conv.weight[DEAD] = 0.0
        net.conv.bias[DEAD] = -1.0
    return net
'''


@pytest.fixture(scope="session")
def dead_channel_model(tmp_path_factory):
    """(model spec, folder to put on PYTHONPATH) of a factory model whose layer 'relu' has exactly one
    dead channel, DEAD_CHANNEL."""
    import sys

    folder = tmp_path_factory.mktemp("dead-model")
    (folder / "dead_channel_model_for_test.py").write_text(DEAD_CHANNEL_SRC)
    sys.path.insert(0, str(folder))
    yield {"factory": "dead_channel_model_for_test:build", "input": {"channels": 1, "height": 28, "width": 28}}, folder
    sys.path.remove(str(folder))
