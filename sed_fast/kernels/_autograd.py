"""Shared pieces of the ops' backward passes.

Every differentiable ``sed_fast::<op>`` has a backward op ``sed_fast::<op>_backward`` (its own
custom op, so torch.compile treats the backward as one opaque call, with a fake kernel) whose
backends come from :mod:`.dispatch` like the forward's: ``"triton"`` on CUDA, ``"torch"``
(``torch.func.vjp`` of the op's plain PyTorch reference, recomputed from the saved inputs) everywhere.
The forward saves its inputs only: nothing the size of an activation beyond them.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch


def reference_vjp(forward: Callable[..., torch.Tensor], grad_out: torch.Tensor, inputs: Sequence[torch.Tensor],
                  needs: Sequence[bool], *constants) -> List[Optional[torch.Tensor]]:
    """Gradients of ``forward(*inputs, *constants)`` against ``grad_out``, by a recomputation: one per
    input, None where ``needs`` is False.

    ``torch.func.vjp``, not ``torch.autograd.grad``: a custom op's body runs below autograd (the
    dispatcher excludes the autograd keys there), where plain autograd records nothing, while
    torch.func's transform records at its own level, so it differentiates inside the op too.
    """
    wanted = [i for i, need in enumerate(needs) if need]
    if not wanted:
        return [None] * len(inputs)
    detached = [t.detach() for t in inputs]

    def forward_of_wanted(*leaves):
        args = list(detached)
        for index, leaf in zip(wanted, leaves):
            args[index] = leaf
        return forward(*args, *constants)

    _, vjp = torch.func.vjp(forward_of_wanted, *(detached[i] for i in wanted))
    found = iter(vjp(grad_out))
    return [next(found) if need else None for need in needs]


def zeros_where_missing(grads: Sequence[Optional[torch.Tensor]], inputs: Sequence[torch.Tensor],
                        needs: Sequence[bool]) -> List[torch.Tensor]:
    """Backward ops return a tensor per input: zeros where a needed gradient was unused, an empty
    (0,) tensor where none was asked for (the autograd formula turns that into None)."""
    out = []
    for grad, t, need in zip(grads, inputs, needs):
        if not need:
            out.append(t.new_empty(0))
        elif grad is None:
            out.append(torch.zeros_like(t))
        else:
            out.append(grad)
    return out


def save_inputs(ctx, inputs, output) -> None:
    """The ``setup_context`` of an op whose backward op recomputes from its inputs: the tensor
    inputs saved for backward, the others (flags, sizes, eps) kept in order as ``ctx.constants``."""
    ctx.save_for_backward(*(x for x in inputs if isinstance(x, torch.Tensor)))
    ctx.constants = tuple(x for x in inputs if not isinstance(x, torch.Tensor))


def none_where_not_needed(grads: Sequence[torch.Tensor], needs: Sequence[bool]) -> List[Optional[torch.Tensor]]:
    return [grad if need else None for grad, need in zip(grads, needs)]


def in_layout_of(grad: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``grad`` with the strides of ``torch.empty_like(t)`` (what the fake kernels promise)."""
    target = torch.empty_like(t)
    if grad.stride() == target.stride() or grad.numel() == 0:
        return grad
    return target.copy_(grad)
