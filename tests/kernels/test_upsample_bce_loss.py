"""upsample_bce_loss: the fused training loss (torch chunks, Triton kernels) against the official formula."""
from __future__ import annotations

import pytest
import torch

from sed_fast.kernels import dispatch, upsample_bce_loss, upsample_bce_loss_reference
import sys

module = sys.modules["sed_fast.kernels.upsample_bce_loss"]
OPS = (module.OP_NAME, module.BACKWARD_OP_NAME)

SHAPES = [  # (B, T, h, w) -> (H, W)
    ((2, 5, 7, 5), (29, 23)),
    ((1, 3, 4, 4), (16, 16)),
    ((1, 2, 3, 6), (3, 6)),     # same size
    ((2, 1, 9, 8), (5, 7)),     # downsampling
]


def _inputs(shape, size, dtype, device, generator, ignore=255):
    logits = (torch.randn(*shape, generator=generator) * 3).to(device, dtype)
    labels = torch.randint(0, shape[1], (shape[0], *size), generator=generator)
    labels[torch.rand(labels.shape, generator=generator) < 0.2] = ignore
    return logits, labels.to(device)


def _reference(logits, labels, ignore=255):
    x = logits.detach().clone().requires_grad_()
    loss = upsample_bce_loss_reference(x, labels, ignore)
    loss.backward()
    return loss.detach(), x.grad


def _fused(logits, labels, ignore=255):
    x = logits.detach().clone().requires_grad_()
    loss = upsample_bce_loss(x, labels, ignore)
    loss.backward()
    return loss.detach(), x.grad


@pytest.fixture
def backend(request):
    name = request.param
    for op in OPS:
        dispatch.set_backend(op, name)
    yield name
    for op in OPS:
        dispatch.set_backend(op, None)


def _check(logits, labels, dtype, close_like_torch, what):
    loss, grad = _fused(logits, labels)
    expected, expected_grad = _reference(logits, labels)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(loss)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert abs(float(loss) - float(expected)) <= tolerance * abs(float(expected)), what
    assert grad.dtype == dtype and grad.shape == logits.shape
    if dtype in (torch.float32, torch.float64):
        error = float((grad.double() - expected_grad.double()).norm() / expected_grad.double().norm())
        assert error <= (1e-10 if dtype == torch.float64 else 1e-5), (what, error)
    else:  # both upcast the logits: the gradients differ by their final rounding to 16 bits
        _, grad32 = _reference(logits.float(), labels)
        close_like_torch(grad, grad32, expected_grad, dtype, what)


@pytest.mark.parametrize("backend", ["torch"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
@pytest.mark.parametrize("shape, size", SHAPES, ids=lambda v: "x".join(map(str, v)))
def test_torch_backend_matches_official_formula(backend, dtype, shape, size, generator, poisoned_empty,
                                                close_like_torch):
    logits, labels = _inputs(shape, size, dtype, "cpu", generator)
    _check(logits, labels, dtype, close_like_torch, f"torch {shape}->{size} {dtype}")


@pytest.mark.parametrize("backend", ["torch"], indirect=True)
def test_torch_backend_chunks(backend, generator, monkeypatch, close_like_torch):
    """Chunks of one class of one image (CHUNK_BYTES tiny): the same result."""
    monkeypatch.setattr(module, "CHUNK_BYTES", 1)
    logits, labels = _inputs((2, 4, 5, 6), (11, 13), torch.float32, "cpu", generator)
    _check(logits, labels, torch.float32, close_like_torch, "chunked")


@pytest.mark.parametrize("shape, size", SHAPES, ids=lambda v: "x".join(map(str, v)))
def test_triton_matches_official_formula(device, dtype, shape, size, generator, poisoned_empty, close_like_torch):
    for op in OPS:
        dispatch.set_backend(op, "triton")
    try:
        logits, labels = _inputs(shape, size, dtype, device, generator)
        assert dispatch.resolve_name(module.OP_NAME, logits.device, (logits, labels, 255)) == "triton"
        _check(logits, labels, dtype, close_like_torch, f"triton {shape}->{size} {dtype}")
    finally:
        for op in OPS:
            dispatch.set_backend(op, None)


def test_triton_strided_logits_and_other_ignore(device, generator, close_like_torch):
    """Non-contiguous logits (a channels-last class slice) and ignore_value -1."""
    for op in OPS:
        dispatch.set_backend(op, "triton")
    try:
        base = torch.randn(2, 6, 5, 7, generator=generator).to(device).contiguous(memory_format=torch.channels_last)
        logits = base[:, 1:5]
        labels = torch.randint(-1, 4, (2, 17, 19), generator=generator).to(device)
        loss, grad = _fused(logits, labels, -1)
        expected, expected_grad = _reference(logits, labels, -1)
        assert abs(float(loss) - float(expected)) <= 1e-5 * float(expected)
        assert float((grad - expected_grad).norm() / expected_grad.norm()) <= 1e-5
    finally:
        for op in OPS:
            dispatch.set_backend(op, None)


def test_all_ignored_pixels_have_zero_targets(generator):
    logits = torch.randn(1, 3, 4, 4, generator=generator)
    labels = torch.full((1, 8, 8), 255)
    expected = torch.nn.functional.softplus(torch.nn.functional.interpolate(
        logits, size=(8, 8), mode="bilinear", align_corners=False)).mean()
    assert abs(float(upsample_bce_loss(logits, labels)) - float(expected)) <= 1e-6


def test_gradcheck_float64(generator):
    logits = torch.randn(1, 2, 3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 2, (1, 7, 6), generator=generator)
    labels[0, 0] = 255
    assert torch.autograd.gradcheck(lambda x: upsample_bce_loss(x, labels), (logits,))
    assert torch.autograd.gradcheck(lambda x: upsample_bce_loss_reference(x, labels, 255), (logits,))


def test_opcheck(generator):
    logits = torch.randn(2, 3, 4, 5, generator=generator, requires_grad=True)
    labels = torch.randint(0, 3, (2, 9, 11), generator=generator)
    torch.library.opcheck(module._upsample_bce_loss_op, (logits, labels, 255))
    grad = torch.tensor(1.5)
    torch.library.opcheck(module._upsample_bce_loss_backward_op, (grad, logits.detach(), labels, 255))


@pytest.mark.parametrize("make, error, match", [
    (lambda x, lab: (x[0], lab), ValueError, "logits must be"),
    (lambda x, lab: (x, lab[0]), ValueError, "labels must be"),
    (lambda x, lab: (x, lab.int()), TypeError, "int64"),
    (lambda x, lab: (x.int(), lab), TypeError, "supports"),
    (lambda x, lab: (x, lab.clamp_max(2) + 1), ValueError, "outside 0..2"),
    (lambda x, lab: (x[:, :0], lab), ValueError, "empty"),
])
def test_bad_inputs(generator, make, error, match):
    logits = torch.randn(1, 3, 4, 4, generator=generator)
    labels = torch.randint(0, 3, (1, 6, 6), generator=generator)
    with pytest.raises(error, match=match):
        upsample_bce_loss(*make(logits, labels))
