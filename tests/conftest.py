"""Shared test set-up: Triton kernels run in the interpreter where there is no GPU."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit runs: the interpreter checks it when a kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with -m gpu on the device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(torch.seed() % (2**31))
