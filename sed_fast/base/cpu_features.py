"""The CPU features that decide how fast the CPU path runs, read from ``/proc/cpuinfo`` (Linux).

16-bit matrix products run in hardware only with the matching instructions (x86: AVX512-BF16 or
AMX for bfloat16, AVX512-FP16 or AMX-FP16 for float16; Arm: BF16, FP16 arithmetic); without them
PyTorch converts to float32 and back around every product, several times slower than float32
itself (SED-B, fast model, 640 px image, 128 px encoder input: bfloat16 1592 ms vs float32 220 ms
on a 2-core AVX2 AMD EPYC).
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

#: The features reported (by ``sed-fast doctor``), in /proc/cpuinfo's spelling.
REPORTED = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16",
            "avx512_vnni", "avx_vnni", "asimd", "bf16", "asimdhp")
#: Any one of these makes the dtype's matrix products native.
NATIVE_16BIT = {torch.bfloat16: ("avx512_bf16", "amx_bf16", "bf16"),
                torch.float16: ("avx512_fp16", "amx_fp16", "asimdhp")}


@functools.lru_cache(maxsize=None)
def _all_flags() -> Optional[frozenset]:
    """Every flag of the first CPU (x86 "flags", Arm "Features"); None where unreadable."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("flags", "features") and ":" in line:
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_flags() -> Tuple[str, ...]:
    """The :data:`REPORTED` features this CPU has (empty where /proc/cpuinfo is unreadable)."""
    flags = _all_flags() or frozenset()
    return tuple(flag for flag in REPORTED if flag in flags)


def has_native_16bit(dtype: torch.dtype) -> Optional[bool]:
    """Whether this CPU multiplies ``dtype`` matrices in hardware; None when unknown (no
    /proc/cpuinfo) or for a dtype that is not 16-bit."""
    flags = _all_flags()
    if flags is None or dtype not in NATIVE_16BIT:
        return None
    return any(flag in flags for flag in NATIVE_16BIT[dtype])
