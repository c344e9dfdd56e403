"""Named stages of a forward pass, for profiling.

Models wrap each stage in ``with stage("decoder1.dwconv"):``. By default this costs nothing. When a
recorder is active (``recording()``), each stage is also an NVTX range (CUDA, so Nsight tools
attribute time) and a ``torch.profiler.record_function`` range, and the recorder collects per-stage
times (CUDA events on GPU, wall clock on CPU). The benchmark tooling around it (naming the stages of
the reference, counting FLOPs and bytes per stage) is :mod:`sed_fast.bench.instrument`.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Dict, List, Optional

import torch

_active: Optional["StageRecorder"] = None


class StageRecorder:
    """Collects (stage name -> list of elapsed milliseconds) while active."""

    def __init__(self, device: torch.device, nvtx: bool = True):
        self.device = torch.device(device)
        self.use_cuda = self.device.type == "cuda"
        self.nvtx = nvtx and self.use_cuda
        self._pending: List[tuple] = []   # (name, start, end) events or times
        self.order: List[str] = []
        self.stack: List[str] = []        # names of the stages open now, outermost first
        self.depths: Dict[str, int] = {}  # stage name -> smallest nesting depth it was seen at
        self.calls: Dict[str, int] = defaultdict(int)

    def current(self) -> Optional[str]:
        """The innermost open stage, or None."""
        return self.stack[-1] if self.stack else None

    def begin(self, name: str):
        if name not in self.order:
            self.order.append(name)
        self.depths[name] = min(self.depths.get(name, len(self.stack)), len(self.stack))
        self.calls[name] += 1
        self.stack.append(name)
        if self.nvtx:
            torch.cuda.nvtx.range_push(name)
        profiler_range = torch.profiler.record_function(name)
        profiler_range.__enter__()
        if self.use_cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            start = time.perf_counter()
        return name, start, profiler_range

    def end(self, token) -> None:
        name, start, profiler_range = token
        if self.use_cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        else:
            end = time.perf_counter()
        profiler_range.__exit__(None, None, None)
        if self.nvtx:
            torch.cuda.nvtx.range_pop()
        if self.stack and self.stack[-1] == name:
            self.stack.pop()
        elif name in self.stack:  # unbalanced (an exception inside a hook pair): drop to it
            del self.stack[len(self.stack) - 1 - self.stack[::-1].index(name):]
        self._pending.append((name, start, end))

    def reset(self) -> None:
        """Forget the times recorded so far (keeps the stage order and depths)."""
        if self.use_cuda:
            torch.cuda.synchronize(self.device)
        self._pending.clear()
        self.calls.clear()

    def times_ms(self) -> Dict[str, List[float]]:
        """Per-stage elapsed times in ms (synchronises the device once)."""
        if self.use_cuda:
            torch.cuda.synchronize(self.device)
        out: Dict[str, List[float]] = defaultdict(list)
        for name, start, end in self._pending:
            out[name].append(start.elapsed_time(end) if self.use_cuda else (end - start) * 1e3)
        return dict(out)


@contextmanager
def recording(device, nvtx: bool = True):
    """Activate a :class:`StageRecorder` for the forward passes run inside the block."""
    global _active
    previous = _active
    _active = StageRecorder(device, nvtx=nvtx)
    try:
        yield _active
    finally:
        _active = previous


@contextmanager
def stage(name: str):
    """Mark a stage of the forward pass (a no-op unless a recorder is active)."""
    recorder = _active
    if recorder is None:
        yield
        return
    token = recorder.begin(name)
    try:
        yield
    finally:
        recorder.end(token)


def active_recorder() -> Optional[StageRecorder]:
    """The recorder of the enclosing :func:`recording` block, or None."""
    return _active
