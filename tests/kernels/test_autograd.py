"""Every op on the training path is differentiable: the registered autograd formulas (on CPU, the
``"torch"`` backward: autograd of the reference, recomputed) against autograd of the references,
float64 gradchecks of the references, opcheck with inputs that require grad, torch.compile through
the backward, and the inference-only ops under grad mode."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sed_fast import kernels
from sed_fast.kernels import (class_attention, class_attention_reference, cost_map, cost_map_reference,
                              dwconv_layernorm, dwconv_layernorm_reference, dispatch, gather_rows,
                              topk_union_reject)

BACKWARD_OPS = ("cost_map_backward", "dwconv_layernorm_backward", "class_attention_backward")


@pytest.fixture
def torch_backward():
    """The reference forward and backward, whatever the machine (on CUDA "auto" would pick Triton,
    on CPU the ``cpu`` class attention): the outputs are then compared bit for bit."""
    ops = BACKWARD_OPS + tuple(op.replace("_backward", "") for op in BACKWARD_OPS)
    for op in ops:
        dispatch.set_backend(op, "torch")
    yield
    for op in ops:
        dispatch.set_backend(op, None)


def _randn(*shape, generator, dtype=torch.float32, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=generator) * scale + shift).to(dtype)


def _cost_inputs(generator, dtype=torch.float32):
    return _randn(2, 19, 3, 5, generator=generator, dtype=dtype), _randn(3, 7, 19, generator=generator, dtype=dtype)


def _dwconv_inputs(generator, dtype=torch.float32, channels=12, kernel_size=5):
    x = _randn(3, channels, 6, 7, generator=generator, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return (x, _randn(channels, 1, kernel_size, kernel_size, generator=generator, dtype=dtype, scale=0.2),
            _randn(channels, generator=generator, dtype=dtype, scale=0.1),
            _randn(channels, generator=generator, dtype=dtype, scale=0.2, shift=1.0),
            _randn(channels, generator=generator, dtype=dtype, scale=0.1))


def _attention_inputs(generator, dtype=torch.float32, lengths=(3, 0, 4), pixels=5, channels=16):
    qkv = _randn(sum(lengths), pixels, 3 * channels, generator=generator, dtype=dtype)
    offsets = torch.tensor([0] + [sum(lengths[:i + 1]) for i in range(len(lengths))], dtype=torch.int32)
    return (*qkv.split(channels, dim=-1), offsets)


def _grads(fn, inputs, grad_out):
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    wanted = [t for t in leaves if t.requires_grad]
    return out, torch.autograd.grad(out, wanted, grad_out)


CASES = {
    "cost_map": (lambda g, dt: _cost_inputs(g, dt), cost_map, cost_map_reference),
    "dwconv_layernorm": (lambda g, dt: _dwconv_inputs(g, dt),
                         lambda *a: dwconv_layernorm(*a, eps=1e-5),
                         lambda *a: dwconv_layernorm_reference(*a, eps=1e-5)),
    "class_attention": (lambda g, dt: _attention_inputs(g, dt),
                        lambda q, k, v, off: class_attention(q, k, v, off, num_heads=4),
                        lambda q, k, v, off: class_attention_reference(q, k, v, off, num_heads=4)),
}


@pytest.mark.parametrize("op", sorted(CASES))
def test_gradients_equal_autograd_of_the_reference(op, dtype, generator, torch_backward, poisoned_empty):
    """The op's registered backward (torch backend) is autograd of the reference in each dtype."""
    make, fast, reference = CASES[op]
    inputs = make(generator, dtype)
    out = reference(*inputs)
    grad_out = torch.randn(out.shape, generator=generator).to(dtype)
    got_out, got = _grads(fast, inputs, grad_out)
    expected_out, expected = _grads(reference, inputs, grad_out)
    torch.testing.assert_close(got_out, expected_out, rtol=0, atol=0)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.dtype == dtype and g.shape == e.shape
        assert not torch.isnan(g).any()
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_cost_map_frozen_text_gets_no_gradient(generator, torch_backward):
    """Training freezes the text: only the image side is differentiated (and returned)."""
    img, text = _cost_inputs(generator)
    img.requires_grad_()
    out = cost_map(img, text)
    (grad_img,) = torch.autograd.grad(out, (img,), torch.ones_like(out))
    assert text.grad is None and grad_img.shape == img.shape
    expected = torch.autograd.grad(cost_map_reference(img, text), (img,), torch.ones_like(out))[0]
    torch.testing.assert_close(grad_img, expected, rtol=0, atol=0)


def test_backward_of_empty_inputs():
    img = torch.randn(0, 8, 3, 3, requires_grad=True)
    text = torch.randn(3, 4, 8, requires_grad=True)
    out = cost_map(img, text)
    out.sum().backward()
    assert img.grad.shape == img.shape and torch.equal(text.grad, torch.zeros_like(text))


@pytest.mark.parametrize("op", sorted(CASES))
def test_float64_gradcheck_of_the_references(op, generator):
    _, _, reference = CASES[op]
    small = {  # gradcheck runs two forwards per input element
        "cost_map": lambda: (_randn(2, 6, 2, 3, generator=generator), _randn(2, 3, 6, generator=generator)),
        "dwconv_layernorm": lambda: _dwconv_inputs(generator, channels=3, kernel_size=3)[:1][0][:2, :, :3, :4:2],
        "class_attention": lambda: _attention_inputs(generator, lengths=(2, 0, 3), pixels=2, channels=8),
    }[op]()
    if op == "dwconv_layernorm":  # a strided view of x: its gradient comes back in x's shape
        small = (small, *_dwconv_inputs(generator, channels=3, kernel_size=3)[1:])
    inputs = [t.double().detach().requires_grad_() if t.is_floating_point() else t for t in small]
    assert torch.autograd.gradcheck(reference, tuple(inputs), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_float64_gradcheck_of_the_gather(generator):
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64, generator=generator, requires_grad=True)
    index = torch.tensor([5, 0, 2, 0, 1], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda t: kernels.gather_rows_reference(t, index, 4), (x,))


def _with_grad(*tensors):
    return tuple(t.detach().requires_grad_() if t.is_floating_point() else t for t in tensors)


@pytest.mark.interpreter
def test_opcheck_with_autograd(monkeypatch, generator):
    """opcheck, test_autograd_registration included (inputs that require grad), on every
    differentiable op and on each backward op (their Triton backends here: the interpreter is on)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    img, text = _cost_inputs(generator)
    for channels_last in (True, False):
        torch.library.opcheck(torch.ops.sed_fast.cost_map.default, (*_with_grad(img, text), channels_last))
    torch.library.opcheck(torch.ops.sed_fast.cost_map.default, (_with_grad(img)[0], text, True))
    dw = _dwconv_inputs(generator, channels=4, kernel_size=3)  # small: opcheck runs it many times
    torch.library.opcheck(torch.ops.sed_fast.dwconv_layernorm.default, (*_with_grad(*dw), 1e-6))
    attention = _attention_inputs(generator)
    torch.library.opcheck(torch.ops.sed_fast.class_attention.default, (*_with_grad(*attention), 4, 1e-6))
    x = torch.randn(6, 3, 2, 2, generator=generator, requires_grad=True)
    torch.library.opcheck(torch.ops.sed_fast.gather_rows.default, (x, torch.tensor([5, 0, 2, 0], dtype=torch.int32), 3))

    grad = torch.randn(6, 7, 3, 5, generator=generator)
    for needs in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.sed_fast.cost_map_backward.default, (grad, img, text, True, *needs))
    grad = torch.randn(3, 6, 7, 4, generator=generator)
    torch.library.opcheck(torch.ops.sed_fast.dwconv_layernorm_backward.default, (grad, *dw, 1e-6))
    grad = torch.randn(7, 5, 16, generator=generator)
    torch.library.opcheck(torch.ops.sed_fast.class_attention_backward.default, (grad, *attention, 4, 1e-6))


def test_torch_compile_through_the_backward(generator):
    """A compiled (inductor, fullgraph) decoder-like function trains: its gradients equal eager ones."""
    torch._dynamo.reset()
    img, text = _cost_inputs(generator)
    _, weight, bias, ln_weight, ln_bias = _dwconv_inputs(generator, channels=7, kernel_size=3)
    offsets = torch.tensor([0, 3, 6], dtype=torch.int32)  # B = 2 images of T = 3 classes

    def step(img, weight):
        corr = cost_map(img, text, channels_last=True)                      # (6, 7, 3, 5)
        tokens = dwconv_layernorm(corr, weight, bias, ln_weight, ln_bias)   # (6, 3, 5, 7)
        seq = tokens.reshape(6, 15, 7)[..., :4].repeat(1, 1, 3)             # C = 12: q, k, v of 4
        q, k, v = seq.split(4, dim=-1)
        return F.gelu(class_attention(q, k, v, offsets, num_heads=2)).square().mean()

    leaves = _with_grad(img, weight)
    expected = torch.autograd.grad(step(*leaves), leaves)
    compiled = torch.compile(step, backend="inductor", fullgraph=True)
    leaves = _with_grad(img, weight)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_checkpoint_through_the_ops(generator):
    """torch.utils.checkpoint recomputes the ops in the backward: same gradients."""
    dw = _with_grad(*_dwconv_inputs(generator))

    def block(*args):
        return dwconv_layernorm(*args).relu().sum()

    expected = torch.autograd.grad(block(*dw), dw)
    got = torch.autograd.grad(torch.utils.checkpoint.checkpoint(block, *dw, use_reentrant=False), dw)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_rejection_under_grad_mode_gives_no_graph_and_breaks_nothing(generator):
    """topk_union_reject is inference-only: called on logits that require grad (as the aux heads'
    outputs do while training) it returns plain index tensors, and the rest still differentiates."""
    logits = torch.randn(2, 5, 3, 4, generator=generator, requires_grad=True)
    with torch.enable_grad():
        kept_mask, flat_idx, offsets = topk_union_reject(logits * 2, 2)
    assert not any(t.requires_grad for t in (kept_mask, flat_idx, offsets))
    rows = gather_rows(logits.reshape(10, 12), flat_idx, int(offsets[-1]))
    rows.sum().backward()
    expected = torch.zeros(10, 12)
    expected[flat_idx[:int(offsets[-1])].long()] = 1
    torch.testing.assert_close(logits.grad.reshape(10, 12), expected)


def test_gather_gradient_sums_repeated_rows_in_the_input_layout(generator):
    x = torch.randn(4, 3, 2, 5, generator=generator).contiguous(memory_format=torch.channels_last).requires_grad_()
    index = torch.tensor([1, 3, 1, 0], dtype=torch.int32)
    out = gather_rows(x, index, 3)
    grad = torch.randn(out.shape, generator=generator)
    (got,) = torch.autograd.grad(out, x, grad)
    (expected,) = torch.autograd.grad(x[index[:3].long()], x, grad)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_kernel_benchmark_has_backward_rows(tmp_path):
    """``sed_fast.bench.kernels --ops <op>_backward``: forward + backward rows, gradients checked."""
    import json

    from sed_fast.bench import kernels as bench

    assert bench.main(["--smoke", "--classes", "3", "--reps", "1", "--results-dir", str(tmp_path),
                       "--ops", ",".join(bench.BACKWARD_OPS), "--dtypes", "float32"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "kernels.jsonl").read_text().splitlines() if line.strip()]
    assert {r["op"] for r in rows} == set(bench.BACKWARD_OPS)
    assert len(rows) == 2 * (1 + 2 + 2)  # official + op: the cost map once, the others at 2 smoke levels
    for row in rows:
        assert row["error"] is None and row["valid"] is True, row
        assert row["median_ms"] > 0 and row["bytes"] > 0
        if row["impl"] == "sed_fast":
            assert row["backend"] == "torch" and 0 <= row["max_abs_diff_vs_reference"] <= 1e-4


@pytest.mark.parametrize("op", sorted(CASES))
def test_the_forward_saves_only_its_inputs(op, generator):
    """Nothing the size of an activation is kept for the backward beyond the op's own inputs (the
    backward recomputes): every saved tensor is an input (its storage)."""
    make, fast, _ = CASES[op]
    inputs = _with_grad(*make(generator, torch.float32))
    storages = {t.untyped_storage().data_ptr() for t in inputs}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fast(*inputs)
    assert saved, "nothing saved: the backward could not recompute"
    for t in saved:
        assert t.untyped_storage().data_ptr() in storages, f"saved a non-input {tuple(t.shape)}"
    assert out.requires_grad
