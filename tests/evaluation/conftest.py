"""Evaluation tests share one random-weight model per configuration (building one takes seconds)."""
import pytest
import torch

from eval_synthetic import patch_build

pytestmark = pytest.mark.filterwarnings("ignore::sed_fast.RandomWeightsWarning")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these tiny models are several times faster so on a shared, busy CPU
    (threads spin-waiting on each other); restored after each module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model_cache():
    return {}


@pytest.fixture
def shared_build(monkeypatch, model_cache):
    """``sed_fast.api.build_sed`` built once per configuration (same --seed, same weights as a
    fresh build: the seed is build_sed's)."""
    patch_build(monkeypatch, model_cache)
    return model_cache
