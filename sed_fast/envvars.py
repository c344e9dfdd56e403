"""Reading the package's environment variables: one parser for booleans, one cache root."""
from __future__ import annotations

import os
from pathlib import Path

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def env_flag(name: str, default: bool) -> bool:
    """A boolean variable: 1/true/yes/on or 0/false/no/off (any case); unset or empty -> ``default``;
    anything else is an error that names the variable."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={os.environ[name]!r}: expected one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}")


def cache_root() -> Path:
    """Root of every on-disk cache: ``$SED_FAST_CACHE_DIR``, else ``~/.cache/sed_fast``."""
    root = os.environ.get("SED_FAST_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "sed_fast"
