"""Evaluation tests share one random-weight model per configuration (building one takes seconds)."""
import pytest
import torch

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
    """``sed_fast.api.build_sed`` built once per configuration: the CLI seeds before building, so the
    first build has the weights every fresh run with the same --seed gets."""
    import sed_fast.api as api

    real = api.build_sed

    def build(variant="b", *, impl="reference", checkpoint=None, **kwargs):
        assert checkpoint is None, "the tests use random weights"
        key = (variant, impl) + tuple(sorted((k, str(v)) for k, v in kwargs.items()))
        if key not in model_cache:
            model_cache[key] = real(variant, impl=impl, checkpoint=None, **kwargs)
        return model_cache[key]

    monkeypatch.setattr(api, "build_sed", build)
    return model_cache
