"""What the ops' ``example_inputs`` share: random normal tensors, or unset ones for uses that only
need the shapes (the compile report launches at the model's sizes, up to gigabytes, and never runs)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def normal(shape: Sequence[int], generator: Optional[torch.Generator], device="cpu",
           dtype: torch.dtype = torch.float32, empty: bool = False) -> torch.Tensor:
    """A tensor of ``shape`` on ``device`` in ``dtype``: standard normal values drawn on the CPU from
    ``generator`` (the same values on every device), or unset (``torch.empty``: neither time nor
    memory touched) when ``empty``."""
    if empty:
        return torch.empty(tuple(shape), device=device, dtype=dtype)
    return torch.randn(tuple(shape), generator=generator).to(device, dtype)
