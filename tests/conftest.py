"""Test setup: without a GPU, Triton kernels run under the interpreter on the CPU."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the H100 with `pytest -m gpu`)")
    for item in items:
        if "gpu" in item.keywords and not CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def kernel_device():
    """Where kernel tests run: the GPU when there is one, else the CPU through the Triton interpreter."""
    return "cuda" if CUDA else "cpu"
