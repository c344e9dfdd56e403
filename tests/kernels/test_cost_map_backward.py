"""cost_map backward: the Triton kernels against autograd of the reference cost map."""
from __future__ import annotations

import pytest
import torch

from sed_fast.kernels import cost_map
from sed_fast.kernels.cost_map import cost_map_backward_reference, cost_map_backward_triton


def _inputs(batch, dim, height, width, classes, prompts, dtype, device, generator, channels_last_grad=True):
    img = torch.randn(batch, dim, height, width, generator=generator).to(device, dtype)
    text = torch.randn(classes, prompts, dim, generator=generator).to(device, dtype)
    grad = torch.randn(batch * classes, prompts, height, width, generator=generator).to(device, dtype)
    if channels_last_grad:
        grad = grad.contiguous(memory_format=torch.channels_last)
    return grad, img, text


def _check(got, grad, img, text, dtype, close_like_torch, what, needs=(True, True)):
    expected32 = cost_map_backward_reference(grad.cpu().float(), img.cpu().float(), text.cpu().float(), True, *needs)
    expected_lowp = cost_map_backward_reference(grad, img, text, True, *needs)
    for name, g, e32, elp, need, t in zip(("img", "text"), got, expected32, expected_lowp, needs, (img, text)):
        if need:
            close_like_torch(g, e32, elp, dtype, f"{what} grad {name}")
            assert g.stride() == torch.empty_like(t).stride(), f"{what} grad {name}: strides {g.stride()}"
        else:
            assert g.numel() == 0


@pytest.mark.parametrize("classes, prompts", [(1, 80), (7, 13)], ids=["T1-P80", "T7-P13"])
def test_matches_autograd_of_the_reference(triton_backend, dtype, classes, prompts, generator, poisoned_empty,
                                          close_like_torch):
    """Both sides; D, h*w and T*P not multiples of the tiles; channels-last upstream gradient."""
    device = triton_backend
    grad, img, text = _inputs(2, 72, 5, 7, classes, prompts, dtype, device, generator)
    got = cost_map_backward_triton(grad, img, text, True, True, True)
    _check(got, grad, img, text, dtype, close_like_torch, f"T={classes} P={prompts}")


@pytest.mark.parametrize("needs", [(True, False), (False, True)], ids=["image-only", "text-only"])
def test_one_side(triton_backend, needs, generator, poisoned_empty, close_like_torch):
    device = triton_backend
    grad, img, text = _inputs(1, 24, 3, 4, 5, 6, torch.float32, device, generator, channels_last_grad=False)
    got = cost_map_backward_triton(grad, img, text, False, *needs)
    _check(got, grad, img, text, torch.float32, close_like_torch, f"needs {needs}", needs)


def test_strided_inputs_and_expanded_gradient(triton_backend, generator, close_like_torch):
    """Channels-last and sliced image features, an expanded (stride 0) upstream gradient as
    ``out.sum().backward()`` gives."""
    device = triton_backend
    grad, img, text = _inputs(2, 20, 6, 9, 3, 5, torch.float32, device, generator)
    ones = torch.ones((), device=device).expand(grad.shape)
    for image in (img.contiguous(memory_format=torch.channels_last), img[:, :, 1:, ::2]):
        grad_shape = (6, 5, *image.shape[2:])
        got = cost_map_backward_triton(ones[..., :grad_shape[2], :grad_shape[3]], image, text, True, True, True)
        _check(got, ones[..., :grad_shape[2], :grad_shape[3]], image, text, torch.float32, close_like_torch,
               f"image strides {image.stride()}")


def test_zero_vectors_follow_normalize(triton_backend, generator):
    """A zero feature vector: F.normalize's clamp makes its gradient G / eps, as autograd's."""
    device = triton_backend
    grad, img, text = _inputs(1, 16, 2, 3, 3, 4, torch.float32, device, generator)
    img[0, :, 1, 2] = 0
    text[1, 2] = 0
    got = cost_map_backward_triton(grad, img, text, True, True, True)
    expected = cost_map_backward_reference(grad, img, text, True, True, True)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * float(e.abs().max()))


def test_through_the_op(triton_backend, generator, close_like_torch):
    """``cost_map(...).backward`` runs the Triton backward (the backend the fixture forces)."""
    device = triton_backend
    grad, img, text = _inputs(2, 24, 3, 5, 4, 6, torch.float32, device, generator)
    img.requires_grad_()
    out = cost_map(img, text)
    (got,) = torch.autograd.grad(out, img, grad)
    expected = cost_map_backward_reference(grad, img.detach(), text, True, True, False)[0]
    close_like_torch(got, expected, None, torch.float32, "through the op")


@pytest.mark.slow
def test_model_shapes(triton_backend, generator, close_like_torch):
    device = triton_backend
    grad, img, text = _inputs(1, 640, 24, 24, 20, 80, torch.bfloat16, device, generator)
    _check(cost_map_backward_triton(grad, img, text, True, True, True), grad, img, text, torch.bfloat16,
           close_like_torch, "SED-B 24x24")
