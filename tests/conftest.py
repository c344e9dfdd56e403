"""Shared test set-up: seeds, a private text-embedding cache, the --run-slow option."""
import os
import tempfile

import pytest
import torch

# Tests never write into the user's cache.
os.environ.setdefault("SED_FAST_CACHE_DIR", tempfile.mkdtemp(prefix="sed_fast_test_cache_"))


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the tests marked slow (large interpreter cases, full-size models)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0
