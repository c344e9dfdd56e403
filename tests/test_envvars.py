"""Environment variables: one parser for booleans, one place for the cache root."""
from pathlib import Path

import pytest

from sed_fast.base.envvars import cache_root, env_flag, env_number

NAME = "SED_FAST_TEST_FLAG"


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", "Yes", " on ", "On\n"])
def test_true_words(monkeypatch, raw):
    monkeypatch.setenv(NAME, raw)
    assert env_flag(NAME, False) is True


@pytest.mark.parametrize("raw", ["0", "false", "False", "NO", " off ", "Off"])
def test_false_words(monkeypatch, raw):
    monkeypatch.setenv(NAME, raw)
    assert env_flag(NAME, True) is False


@pytest.mark.parametrize("default", [True, False])
def test_unset_or_empty_gives_the_default(monkeypatch, default):
    monkeypatch.delenv(NAME, raising=False)
    assert env_flag(NAME, default) is default
    monkeypatch.setenv(NAME, "  ")
    assert env_flag(NAME, default) is default


@pytest.mark.parametrize("raw", ["2", "nope", "y", "enable", "true!"])
def test_anything_else_is_an_error_naming_the_variable(monkeypatch, raw):
    monkeypatch.setenv(NAME, raw)
    with pytest.raises(ValueError) as info:
        env_flag(NAME, False)
    assert NAME in str(info.value) and "1/true/yes/on" in str(info.value) and "0/false/no/off" in str(info.value)


def test_env_number(monkeypatch):
    monkeypatch.delenv(NAME, raising=False)
    assert env_number(NAME, 7) == 7
    monkeypatch.setenv(NAME, " 12 ")
    assert env_number(NAME, 7) == 12
    monkeypatch.setenv(NAME, "0.5")
    assert env_number(NAME, 7) == 0.5
    for bad in ("-1", "nan", "inf", "lots"):
        monkeypatch.setenv(NAME, bad)
        with pytest.raises(ValueError, match=NAME):
            env_number(NAME, 7)


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("SED_FAST_CACHE_DIR", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.setenv("SED_FAST_CACHE_DIR", "~/somewhere")
    assert cache_root() == Path.home() / "somewhere"
    monkeypatch.delenv("SED_FAST_CACHE_DIR")
    assert cache_root() == Path.home() / ".cache" / "sed_fast"


def test_text_cache_uses_the_one_cache_root(monkeypatch, tmp_path):
    from sed_fast.data import text

    monkeypatch.setattr(text, "cache_root", lambda: tmp_path / "elsewhere", raising=False)
    assert text.default_cache_dir() == tmp_path / "elsewhere" / "text"


@pytest.mark.parametrize("raw", ["no", "false", "off", "False"])
def test_text_cache_off_words(monkeypatch, raw):
    from sed_fast.data.text import cache_enabled

    monkeypatch.setenv("SED_FAST_TEXT_CACHE", raw)
    assert cache_enabled(True) is False


def test_text_cache_typo_is_an_error(monkeypatch):
    from sed_fast.data.text import cache_enabled

    monkeypatch.setenv("SED_FAST_TEXT_CACHE", "nein")
    with pytest.raises(ValueError, match="SED_FAST_TEXT_CACHE"):
        cache_enabled(True)


# -- the registry, driven by the README's table ---------------------------------------------------
import contextlib  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402

from sed_fast.base import envvars  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_variables():
    """The variable names of the README's "Environment variables" table, in order."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    return [m.group(1) for m in re.finditer(r"^\| `([A-Z0-9_<>]+)` \|", section, re.MULTILINE)]


TABLE = _readme_variables()
# A value each kind accepts (the check must not refuse a good value either).
GOOD = {"flag": "on", "triton_flag": "1", "number": "64", "integer": "3", "choice": "torch", "folder": "{tmp}",
        "archs": "8.0;9.0+PTX", "text": "anything at all"}


def _concrete(name):
    return name.replace("<OP>", "COST_MAP")


def _main(argv):
    from sed_fast import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, err.getvalue()


def test_the_table_and_the_registry_list_the_same_variables():
    assert len(TABLE) >= 20 and len(set(TABLE)) == len(TABLE)
    assert set(TABLE) == set(envvars.VARIABLES), (
        f"in the README's table only: {sorted(set(TABLE) - set(envvars.VARIABLES))}; "
        f"in sed_fast/base/envvars.py only: {sorted(set(envvars.VARIABLES) - set(TABLE))}")


def test_every_sed_fast_variable_the_code_reads_is_in_the_table():
    root = README.parent
    used = set()
    for folder in ("sed_fast", "tests", "benchmarks", "tools"):
        for path in (root / folder).rglob("*"):
            if path.suffix in (".py", ".sh") and path.is_file():
                used |= set(re.findall(r"\bSED_FAST_[A-Z0-9_]*[A-Z0-9]", path.read_text(encoding="utf-8")))
    used -= {"SED_FAST_TEST_FLAG", "SED_FAST_TYPO_VARIABLE", "SED_FAST_BACKEND_COSTMAP"}  # this file's own names
    unknown = {name for name in used if not any(known.startswith(name) for known in envvars.VARIABLES)
               and not (name.startswith("SED_FAST_BACKEND_") and name[17:].lower() in envvars.BACKEND_OPS)}
    assert not unknown, f"read by the code but not in the README's table / the registry: {sorted(unknown)}"


def test_the_backend_ops_are_the_dispatchers():
    from sed_fast.kernels import dispatch

    assert sorted(envvars.BACKEND_OPS) == sorted(dispatch.ops())


@pytest.mark.parametrize("name", TABLE)
def test_each_variable_is_checked_at_start_up(name, monkeypatch, tmp_path):
    """A bad value: exit 2 naming the variable, the value and what is allowed, before the model is
    built and before --out is made; a good value passes the check."""
    import sed_fast.api

    entry = envvars.VARIABLES[name]
    concrete = _concrete(name)
    good = GOOD[entry.kind].format(tmp=tmp_path)
    monkeypatch.setenv(concrete, good)
    assert envvars.check_environment() == [] or not concrete.startswith("SED_FAST_")
    if entry.bad is None:
        assert entry.kind == "text"  # nothing to refuse
        return
    bad = entry.bad
    if bad == "<a file>":
        (tmp_path / "file").write_text("x")
        bad = str(tmp_path / "file")
    monkeypatch.setenv(concrete, bad)
    monkeypatch.setattr(sed_fast.api, "build_sed", lambda *a, **k: pytest.fail("the model was built"))
    image = tmp_path / "img.png"
    from PIL import Image
    Image.new("RGB", (40, 40)).save(image)
    code, err = _main(["segment", image, "--vocab", "a,b", "--random-weights", "--device", "cpu", "--out",
                       tmp_path / "o"])
    assert code == 2, err
    assert f"{concrete}={bad!r}" in err and entry.allowed() in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["segment", "eval", "bench", "bench-kernels", "profile", "report",
                                     "compile-report", "demo"])
def test_every_command_checks_the_environment_first(command, monkeypatch):
    monkeypatch.setenv("SED_FAST_TEXT_CACHE_MB", "big")
    monkeypatch.setenv("SED_FAST_BACKEND", "gpu")
    code, err = _main([command, "--out", "/nonexistent/x"])
    assert code == 2
    assert "SED_FAST_TEXT_CACHE_MB='big'" in err and "SED_FAST_BACKEND='gpu'" in err
    code, err = _main([command, "--help"])  # help still works with a bad environment
    assert code == 0


def test_chunk_mb_message_does_not_contradict_itself(monkeypatch):
    monkeypatch.setenv("SED_FAST_CHUNK_MB", "0")
    with pytest.raises(ValueError) as info:
        envvars.env_value("SED_FAST_CHUNK_MB")
    message = str(info.value)
    assert "SED_FAST_CHUNK_MB='0'" in message and ">= 0.001" in message and "default: auto" in message
    assert "default: 0)" not in message


def test_unknown_op_and_unknown_name(monkeypatch):
    monkeypatch.setenv("SED_FAST_BACKEND_COSTMAP", "torch")
    with pytest.raises(envvars.EnvError, match="SED_FAST_BACKEND_COSTMAP names no op.*COST_MAP"):
        envvars.check_environment()
    monkeypatch.delenv("SED_FAST_BACKEND_COSTMAP")
    monkeypatch.setenv("SED_FAST_TYPO_VARIABLE", "1")
    warnings = envvars.check_environment()
    assert len(warnings) == 1 and "SED_FAST_TYPO_VARIABLE" in warnings[0]


@pytest.mark.parametrize("name, bad, read", [
    ("SED_FAST_AUTOTUNE_ITERS", "0", lambda: __import__("sed_fast.kernels.autotune", fromlist=["_"])._iters()),
    ("SED_FAST_AUTOTUNE", "perhaps", lambda: __import__("sed_fast.kernels.dispatch", fromlist=["_"])
     .autotune_enabled()),
    ("SED_FAST_AUTOTUNE_CACHE", "perhaps", lambda: __import__("sed_fast.kernels.autotune", fromlist=["_"])
     ._disk_cache_on()),
    ("SED_FAST_JIT_BUILD", "auto", lambda: __import__("sed_fast.kernels.cuda_extension", fromlist=["_"])._jit_policy()),
    ("SED_FAST_BACKEND_COST_MAP", "gpu", lambda: __import__("sed_fast.kernels.dispatch", fromlist=["_"])
     .requested_backend("cost_map")),
])
def test_the_readers_use_the_registry(name, bad, read, monkeypatch):
    """The code that reads a variable later parses it the same way (no silent acceptance)."""
    monkeypatch.setenv(name, bad)
    with pytest.raises(envvars.EnvError, match=re.escape(f"{name}={bad!r}")):
        read()
