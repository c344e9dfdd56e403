"""Environment variables: one parser for booleans, one place for the cache root."""
from pathlib import Path

import pytest

from sed_fast.envvars import cache_root, env_flag, env_number

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
    from sed_fast import text

    monkeypatch.setattr(text, "cache_root", lambda: tmp_path / "elsewhere", raising=False)
    assert text.default_cache_dir() == tmp_path / "elsewhere" / "text"


@pytest.mark.parametrize("raw", ["no", "false", "off", "False"])
def test_text_cache_off_words(monkeypatch, raw):
    from sed_fast.text import cache_enabled

    monkeypatch.setenv("SED_FAST_TEXT_CACHE", raw)
    assert cache_enabled(True) is False


def test_text_cache_typo_is_an_error(monkeypatch):
    from sed_fast.text import cache_enabled

    monkeypatch.setenv("SED_FAST_TEXT_CACHE", "nein")
    with pytest.raises(ValueError, match="SED_FAST_TEXT_CACHE"):
        cache_enabled(True)
