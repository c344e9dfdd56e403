"""Shared test set-up: seeds, a private text-embedding cache, the --run-slow option."""
import os
import sys
import tempfile

import pytest
import torch

# Tests never write into the user's cache.
os.environ.setdefault("SED_FAST_CACHE_DIR", tempfile.mkdtemp(prefix="sed_fast_test_cache_"))

# Triton fixes interpreted-or-compiled when it is imported. Without a GPU (or with TRITON_INTERPRET=1
# asked) it is imported here, before any test module can import it, in interpreter mode, so that the
# kernel tests can run the kernels on CPU tensors (see tests/kernels/conftest.py); the variable is
# restored, so that other tests keep the torch path on CPU.
if (os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or not torch.cuda.is_available()) \
        and "triton" not in sys.modules:
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401  (imported in interpreter mode)
        import sed_fast.kernels  # noqa: F401  (the kernels too)
    finally:
        if _saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _saved


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


def _version(distribution: str) -> tuple:
    from importlib.metadata import PackageNotFoundError, version
    try:
        parts = (version(distribution).split("+")[0].split(".") + ["0", "0"])[:2]
    except PackageNotFoundError:
        return ()
    return tuple(int("".join(ch for ch in part if ch.isdigit()) or 0) for part in parts)


def interpreter_numpy_problem() -> str:
    """Why the Triton interpreter cannot run the kernel tests here, or "". Triton <= 3.6's interpreter
    makes scalar kernel arguments 1-element arrays and calls int() on them (loop bounds), which NumPy
    >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"); Triton 3.9 is fine.
    Read from package metadata: importing triton here would fix its mode before tests/kernels sets it."""
    interpreter = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or not torch.cuda.is_available()
    triton_version, numpy_version = _version("triton"), _version("numpy")
    if interpreter and triton_version and triton_version < (3, 7) and numpy_version >= (2, 4):
        return ("the Triton interpreter of Triton %s fails on NumPy %s: the cpu-interpreter kernel tests will fail; "
                "pip install 'numpy<2.4' (or Triton >= 3.7)" % (".".join(map(str, triton_version)),
                                                               ".".join(map(str, numpy_version))))
    return ""


def pytest_report_header(config):
    problem = interpreter_numpy_problem()
    return [f"WARNING: {problem}"] if problem else []


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    problem = interpreter_numpy_problem()
    if problem:  # at the end too: -q hides the header, and this explains the failures listed above
        terminalreporter.write_line(f"WARNING: {problem}", yellow=True, bold=True)


@pytest.fixture
def fake_build(monkeypatch):
    """``sed_fast.api.build_sed`` builds a FakeModel (tests/fake_model.py); the fixture's value lists the
    variants asked for, so a test can check that no model was built."""
    import sed_fast.api
    from fake_model import FakeModel

    calls = []

    def build(variant, **kwargs):
        calls.append(variant)
        return FakeModel()

    monkeypatch.setattr(sed_fast.api, "build_sed", build)
    return calls
