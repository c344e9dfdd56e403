"""Reading sed_fast's environment variables: one parser for booleans, one for numbers, one cache root.

Every variable is listed, with its default, in the README's table. A boolean variable accepts
``1/true/yes/on`` and ``0/false/no/off`` (any case, surrounding spaces ignored); unset or empty
means its default, anything else is an error (a typo in a security switch must not silently mean
"on").
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["env_flag", "env_number", "cache_root", "TRUE_WORDS", "FALSE_WORDS"]

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def env_flag(name: str, default: bool) -> bool:
    """The boolean environment variable ``name``: unset or empty gives ``default``.

    Raises ``ValueError`` naming the variable and the accepted values for anything that is not one
    of ``1/true/yes/on`` or ``0/false/no/off`` (case-insensitive, surrounding spaces ignored).
    """
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return bool(default)
    value = raw.strip().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise ValueError(f"environment variable {name}={raw!r} is not a boolean: use one of "
                     f"{'/'.join(TRUE_WORDS)} (on) or {'/'.join(FALSE_WORDS)} (off), or unset it "
                     f"(default: {'on' if default else 'off'})")


def env_number(name: str, default: float, minimum: float = 0.0) -> float:
    """The numeric environment variable ``name`` (a number >= ``minimum``, e.g. ``512`` or ``0.5``):
    unset or empty gives ``default``; anything else raises ``ValueError`` naming the variable."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return float(default)
    try:
        value = float(raw.strip())
    except ValueError:
        value = None
    if value is None or not value >= minimum or value == float("inf"):
        raise ValueError(f"environment variable {name}={raw!r} must be a number >= {minimum:g}, or unset "
                         f"(default: {default:g})")
    return value


def cache_root() -> Path:
    """The sed_fast cache root: ``$SED_FAST_CACHE_DIR`` (``~`` expanded), else ``~/.cache/sed_fast``."""
    root = os.environ.get("SED_FAST_CACHE_DIR", "")
    return Path(root).expanduser() if root.strip() else Path.home() / ".cache" / "sed_fast"
