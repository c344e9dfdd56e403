"""The run record every command that writes results puts beside them: what ran, where, with what.

:func:`run_record` gives the command line, the versions, the device, the CPU's features, the thread
count, the git commit of the sources, the PID and the host, as a JSON-ready dict.
"""
from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional


def now() -> str:
    """The current UTC time, ISO 8601 with milliseconds."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def git_commit(path: Optional[Path] = None) -> dict:
    """The git commit of the sed_fast sources (and whether they have uncommitted changes), if known."""
    folder = Path(path or Path(__file__).resolve().parents[2])
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def environment(device=None) -> dict:
    """Versions of sed_fast, Python and the libraries it uses, the platform and ``device``."""
    import numpy as np
    import torch

    from .. import __version__

    versions = {"sed_fast": __version__, "python": platform.python_version(), "torch": torch.__version__,
                "numpy": np.__version__}
    for module in ("open_clip", "PIL", "triton", "matplotlib"):
        try:
            versions[module] = getattr(__import__(module), "__version__", "unknown")
        except Exception:  # noqa: BLE001 - optional
            versions[module] = None
    info = {"versions": versions, "platform": platform.platform(), "cuda": torch.version.cuda}
    if device is not None:
        info["device"] = str(device)
        if getattr(device, "type", None) == "cuda":
            info["device_name"] = torch.cuda.get_device_name(device)
    return info


def run_record(device=None, argv=None) -> dict:
    """The command line, versions, device, CPU features, threads, commit, PID and host of this run."""
    import torch

    from ..base.cpu_features import cpu_flags

    return {"argv": list(sys.argv if argv is None else argv), **environment(device),
            "cpu_features": list(cpu_flags()), "threads": torch.get_num_threads(), **git_commit(),
            "pid": os.getpid(), "host": socket.gethostname()}
