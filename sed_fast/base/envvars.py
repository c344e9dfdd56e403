"""sed_fast's environment variables: one registry, one parser, one start-up check, one cache root.

:data:`VARIABLES` lists every variable of the README's table (a test keeps the two identical), with
its kind, default and what it allows. :func:`env_value` reads one (parsed, or its default when
unset or empty); :func:`check_environment` reads them all, so that ``sed-fast`` refuses a bad value
once at start-up (exit 2) instead of failing each image later.

A boolean variable accepts ``1/true/yes/on`` and ``0/false/no/off`` (any case, surrounding spaces
ignored); unset or empty means its default, anything else is an error (a typo in a security switch
must not silently mean "on"). Variables read by other programs (Triton, torch's extension builder,
shell scripts) are checked against what those programs accept.

A new variable needs a row in the README's table and an entry in :data:`VARIABLES` (with a ``bad``
value it refuses, unless it is free text): ``tests/test_envvars.py`` fails while the two differ.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

__all__ = ["env_flag", "env_number", "env_value", "cache_root", "check_environment", "variable", "EnvError",
           "Variable", "VARIABLES", "BACKEND_OPS", "TRUE_WORDS", "FALSE_WORDS"]

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
# Triton's own boolean parser (getBoolEnv) takes only these as on; "yes" would silently mean off.
_TRITON_TRUE = ("1", "true", "on")
_TRITON_FALSE = ("0", "false", "off")

#: The ops of sed_fast.kernels.dispatch (a test checks this list against the registered ops).
BACKEND_OPS = ("class_attention", "class_attention_backward", "cost_map", "cost_map_backward", "dwconv_layernorm",
               "dwconv_layernorm_backward", "gather_rows", "pil_bilinear_resize", "topk_union_reject",
               "upsample_bce_loss", "upsample_bce_loss_backward")
_BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")
_ARCH = r"(\d+\.\d+a?|Kepler|Kepler\+Tesla|Maxwell|Maxwell\+Tegra|Pascal|Volta|Turing|Ampere|Ada|Hopper)(\+PTX)?"
_ARCHS = re.compile(rf"\s*{_ARCH}([;\s]+{_ARCH})*\s*")


class EnvError(ValueError):
    """A malformed environment variable (the message names it, its value and what it allows)."""


@dataclass(frozen=True)
class Variable:
    """One environment variable. ``kind``: ``flag``, ``number``, ``integer``, ``choice``, ``folder``
    (a path that, if it exists, is a folder), ``archs`` (CUDA architectures), ``triton_flag`` or
    ``text`` (any value). ``default``: the value when unset (None: decided at run time, as
    ``default_text`` says); ``bad``: a value it refuses (None for ``text``: there is none)."""

    name: str
    kind: str
    default: object
    default_text: str
    minimum: float = 0.0
    choices: Tuple[str, ...] = ()
    bad: Optional[str] = None

    def allowed(self) -> str:
        """What the variable accepts, in words (for error messages)."""
        if self.kind == "flag":
            return (f"use one of {'/'.join(TRUE_WORDS)} (on) or {'/'.join(FALSE_WORDS)} (off), or unset it "
                    f"(default: {self.default_text})")
        if self.kind == "triton_flag":
            return (f"Triton reads only {'/'.join(_TRITON_TRUE)} (on) and {'/'.join(_TRITON_FALSE)} (off), any case "
                    f"and no spaces, or unset (default: {self.default_text})")
        if self.kind == "number":
            return f"must be a number >= {self.minimum:g}, or unset (default: {self.default_text})"
        if self.kind == "integer":
            return f"must be a whole number >= {self.minimum:g}, or unset (default: {self.default_text})"
        if self.kind == "choice":
            return f"must be one of {', '.join(self.choices)} (any case), or unset (default: {self.default_text})"
        if self.kind == "folder":
            return f"must be a folder (or a path where one can be made), or unset (default: {self.default_text})"
        if self.kind == "archs":
            return ("must be CUDA architectures such as '9.0+PTX' or '8.0;9.0' (separated by ';' or spaces), "
                    f"or unset (default: {self.default_text})")
        return "any value"

    def parse(self, raw: Optional[str], name: Optional[str] = None):
        """``raw`` (the variable's text, None when unset) parsed; raises :class:`EnvError`."""
        name = name or self.name
        if raw is None or not raw.strip():
            return self.default
        text = raw.strip()
        value = None
        if self.kind == "flag":
            value = {**{w: True for w in TRUE_WORDS}, **{w: False for w in FALSE_WORDS}}.get(text.lower())
        elif self.kind == "triton_flag":
            value = {**{w: True for w in _TRITON_TRUE}, **{w: False for w in _TRITON_FALSE}}.get(raw.lower())
        elif self.kind in ("number", "integer"):
            try:
                number = float(text) if self.kind == "number" else int(text)
            except ValueError:
                number = None
            if number is not None and number >= self.minimum and number != float("inf"):
                value = number
        elif self.kind == "choice":
            value = text.lower() if text.lower() in self.choices else None
        elif self.kind == "folder":
            path = Path(text).expanduser()
            value = None if path.exists() and not path.is_dir() else path
        elif self.kind == "archs":
            value = text if _ARCHS.fullmatch(text) else None
        else:
            value = raw
        if value is None:
            detail = "is not a boolean" if self.kind in ("flag", "triton_flag") else ""
            if self.kind == "folder":
                detail = "is not a folder"
            raise EnvError(f"environment variable {name}={raw!r} {detail + ': ' if detail else ''}{self.allowed()}")
        return value


def _flag(name, default: bool, bad="maybe"):
    return Variable(name, "flag", default, "on" if default else "off", bad=bad)


# Keyed as the README's table names them; SED_FAST_BACKEND_<OP> stands for one variable per op.
VARIABLES: Dict[str, Variable] = {v.name: v for v in (
    Variable("SED_FAST_BACKEND", "choice", None, "auto", choices=_BACKENDS, bad="fastest"),
    Variable("SED_FAST_BACKEND_<OP>", "choice", None, "unset: SED_FAST_BACKEND", choices=_BACKENDS, bad="gpu"),
    _flag("SED_FAST_AUTOTUNE", False),
    _flag("SED_FAST_ONEDNN_LINEAR", True),
    Variable("SED_FAST_AUTOTUNE_ITERS", "integer", 5, "5", minimum=1, bad="0"),
    _flag("SED_FAST_AUTOTUNE_CACHE", False),
    Variable("TRITON_INTERPRET", "triton_flag", False, "off", bad="yes"),
    Variable("SED_FAST_CACHE_DIR", "folder", None, "~/.cache/sed_fast", bad="<a file>"),
    _flag("SED_FAST_TEXT_CACHE", True),
    Variable("SED_FAST_TEXT_CACHE_MB", "number", 2048.0, "2048", minimum=0, bad="big"),
    Variable("SED_FAST_CHUNK_MB", "number", None, "auto: a quarter of the free GPU memory, at most 2048, "
             "on CUDA; 64 on CPU", minimum=1e-3, bad="0"),
    _flag("SED_FAST_TRUST_CHECKPOINTS", False),
    _flag("SED_FAST_BUILD_CUDA", False),
    Variable("SED_FAST_CUDA_ARCHS", "archs", None, "9.0+PTX; the JIT build: the visible GPUs'", bad="sm_90"),
    Variable("SED_FAST_JIT_BUILD", "flag", None, "GPU only", bad="auto"),
    Variable("SED_FAST_CUDA_BUILD_DIR", "folder", None, "under the cache root", bad="<a file>"),
    Variable("MAX_JOBS", "integer", None, "from the cores and memory", minimum=1, bad="many"),
    Variable("CUDA_HOME", "text", None, "from nvcc"),
    Variable("DETECTRON2_DATASETS", "text", None, "datasets"),
    Variable("SED_FAST_RESULTS_DIR", "folder", None, "./sed_fast_results", bad="<a file>"),
    Variable("SED_FAST_BENCH_DEVICE", "text", None, "cpu"),
    Variable("SED_FAST_MAX_PIXELS", "integer", None, "Pillow's MAX_IMAGE_PIXELS (0: no limit)", minimum=0,
             bad="-1"),
    Variable("OUT", "text", None, "out/gpu_pass"),
    Variable("GPU_PASS_BUDGET", "integer", 280, "280", minimum=1, bad="soon"),
    Variable("SED_EVAL_GPU_IMAGES", "integer", 200, "200", minimum=1, bad="all"),
    Variable("SED_EVAL_GPU_OUT", "text", None, "unset"),
    Variable("COMPUTE_SANITIZER", "text", None, "found on PATH / CUDA_HOME"),
    Variable("SANITIZER_TESTS", "text", None, "the CUDA-backend cases"),
    Variable("SANITIZER_KERNELS", "text", None, "all"),
    _flag("SED_FAST_SANITIZER", False),
    Variable("KINETO_LOG_LEVEL", "integer", None, "6 without CUDA", minimum=0, bad="quiet"),
)}
_OP_PREFIX = "SED_FAST_BACKEND_"


def variable(name: str) -> Variable:
    """The registry entry of the variable ``name`` (``SED_FAST_BACKEND_COST_MAP`` gives the
    ``SED_FAST_BACKEND_<OP>`` entry, for any op name: dispatch also reads it for ops registered at
    run time); raises KeyError for a name that is not registered."""
    if name in VARIABLES:
        return VARIABLES[name]
    if name.startswith(_OP_PREFIX):
        return VARIABLES[_OP_PREFIX + "<OP>"]
    raise KeyError(f"{name} is not a sed_fast environment variable (see the README's table)")


def _check_op_name(name: str) -> None:
    """At start-up, ``SED_FAST_BACKEND_<OP>`` must name one of sed_fast's ops (a typo would be ignored)."""
    if name.startswith(_OP_PREFIX) and name not in VARIABLES and name[len(_OP_PREFIX):].lower() not in BACKEND_OPS:
        raise EnvError(f"environment variable {name} names no op: SED_FAST_BACKEND_<OP> takes OP one of "
                       f"{', '.join(op.upper() for op in BACKEND_OPS)}")


def env_value(name: str, environ: Optional[Mapping[str, str]] = None):
    """The variable ``name`` parsed as its registry entry says (its default when unset or empty);
    raises :class:`EnvError` (a ValueError) naming the variable, its value and what is allowed."""
    environ = os.environ if environ is None else environ
    return variable(name).parse(environ.get(name), name)


def check_environment(environ: Optional[Mapping[str, str]] = None) -> List[str]:
    """Parse every registered variable that is set (and every ``SED_FAST_BACKEND_<OP>``); raise
    :class:`EnvError` listing every bad one. Returns warnings: ``SED_FAST_*`` names the registry
    does not know (a typo would otherwise be ignored silently)."""
    environ = os.environ if environ is None else environ
    problems, warnings = [], []
    for name in sorted(environ):
        try:
            if name in VARIABLES or name.startswith(_OP_PREFIX):
                _check_op_name(name)
                env_value(name, environ)
            elif name.startswith("SED_FAST_"):
                warnings.append(f"environment variable {name} is not one sed_fast reads (see the README's table; "
                                f"known: {', '.join(n for n in VARIABLES if n.startswith('SED_FAST_'))})")
        except EnvError as error:
            problems.append(str(error))
    if problems:
        raise EnvError("; ".join(problems))
    return warnings


def env_flag(name: str, default: bool) -> bool:
    """The boolean environment variable ``name``: unset or empty gives ``default``.

    Raises ``ValueError`` naming the variable and the accepted values for anything that is not one
    of ``1/true/yes/on`` or ``0/false/no/off`` (case-insensitive, surrounding spaces ignored).
    """
    return bool(_flag(name, bool(default)).parse(os.environ.get(name)))


def env_number(name: str, default: float, minimum: float = 0.0) -> float:
    """The numeric environment variable ``name`` (a number >= ``minimum``, e.g. ``512`` or ``0.5``):
    unset or empty gives ``default``; anything else raises ``ValueError`` naming the variable."""
    entry = Variable(name, "number", float(default), f"{default:g}", minimum=minimum)
    return float(entry.parse(os.environ.get(name)))


def cache_root() -> Path:
    """The sed_fast cache root: ``$SED_FAST_CACHE_DIR`` (``~`` expanded), else ``~/.cache/sed_fast``."""
    root = env_value("SED_FAST_CACHE_DIR")
    return root if root is not None else Path.home() / ".cache" / "sed_fast"
