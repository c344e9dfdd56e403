"""Shared pieces of the ops' backward passes.

Every differentiable ``sed_fast::<op>`` has a backward op ``sed_fast::<op>_backward`` (its own
custom op, so torch.compile treats the backward as one opaque call, with a fake kernel) whose
backends come from :mod:`.dispatch` like the forward's: ``"triton"`` on CUDA, ``"torch"``
(autograd of the op's plain PyTorch reference, recomputed from the saved inputs) everywhere.
The forward saves its inputs only: nothing the size of an activation beyond them.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Optional, Sequence

import torch

# The keys autograd records through. A custom op's body runs below autograd (the dispatcher
# excludes these keys while it runs), so the reference backward, which differentiates the
# reference forward, has to lift that exclusion for its own recomputation.
_AUTOGRAD_KEYS = (torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradFunctionality)
                  | torch._C.DispatchKeySet(torch._C.DispatchKey.ADInplaceOrView))


@contextlib.contextmanager
def autograd_inside_op() -> Iterator[None]:
    """Within: autograd records again (grad mode on, autograd dispatch keys no longer excluded),
    autocast still off as in any op body."""
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set()
    with torch._C._ForceDispatchKeyGuard(include, exclude - _AUTOGRAD_KEYS), torch.enable_grad():
        yield


def reference_vjp(forward: Callable[..., torch.Tensor], grad_out: torch.Tensor, inputs: Sequence[torch.Tensor],
                  needs: Sequence[bool], *constants) -> List[Optional[torch.Tensor]]:
    """Gradients of ``forward(*inputs, *constants)`` against ``grad_out``, by autograd of a
    recomputation: one per input, None where ``needs`` is False (or nothing reaches it)."""
    with autograd_inside_op():
        leaves = [t.detach().requires_grad_(bool(need)) for t, need in zip(inputs, needs)]
        out = forward(*leaves, *constants)
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        grads = torch.autograd.grad(out, wanted, grad_out, allow_unused=True) if wanted else ()
    found = iter(grads)
    return [next(found) if leaf.requires_grad else None for leaf in leaves]


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


def none_where_not_needed(grads: Sequence[torch.Tensor], needs: Sequence[bool]) -> List[Optional[torch.Tensor]]:
    return [grad if need else None for grad, need in zip(grads, needs)]


def in_layout_of(grad: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``grad`` with the strides of ``torch.empty_like(t)`` (what the fake kernels promise)."""
    target = torch.empty_like(t)
    if grad.stride() == target.stride() or grad.numel() == 0:
        return grad
    return target.copy_(grad)
