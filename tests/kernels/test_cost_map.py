"""cost_map: the Triton kernel against the official normalise + einsum + rearrange."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from sed_fast.kernels import cost_map, cost_map_reference

PROMPTS = 80


def _inputs(batch, dim, height, width, classes, prompts, dtype, device, generator):
    img = torch.randn(batch, dim, height, width, generator=generator).to(device, dtype)
    text = torch.randn(classes, prompts, dim, generator=generator).to(device, dtype)
    return img, text


def _check(out, img, text, channels_last, dtype, close_like_torch, what):
    reference32 = cost_map_reference(img.cpu().float(), text.cpu().float(), channels_last)
    reference_lowp = cost_map_reference(img, text, channels_last)
    close_like_torch(out, reference32, reference_lowp, dtype, what)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=memory_format), f"{what}: wrong memory format {out.stride()}"


@pytest.mark.parametrize("classes", [1, 7, 150], ids=lambda t: f"T{t}")
def test_matches_reference(triton_backend, dtype, classes, generator, poisoned_empty, close_like_torch):
    """Channels-last output (what conv1 reads); D and h*w are not multiples of the tiles."""
    device = triton_backend
    prompts = PROMPTS if classes < 100 else 12  # keeps the interpreter run short at T=150
    img, text = _inputs(2, 72, 5, 7, classes, prompts, dtype, device, generator)
    out = cost_map(img, text, channels_last=True)
    assert out.shape == (2 * classes, prompts, 5, 7)
    _check(out, img, text, True, dtype, close_like_torch, f"cost_map T={classes}")


def test_contiguous_output(triton_backend, dtype, generator, poisoned_empty, close_like_torch):
    device = triton_backend
    img, text = _inputs(2, 40, 3, 5, 7, PROMPTS, dtype, device, generator)
    out = cost_map(img, text, channels_last=False)
    _check(out, img, text, False, dtype, close_like_torch, "cost_map contiguous")


def test_vocabulary_size_847(triton_backend, generator, poisoned_empty, close_like_torch):
    device = triton_backend
    img, text = _inputs(1, 32, 3, 4, 847, 20, torch.bfloat16, device, generator)
    out = cost_map(img, text)
    _check(out, img, text, True, torch.bfloat16, close_like_torch, "cost_map T=847")


@pytest.mark.slow
def test_model_shapes(triton_backend, generator, close_like_torch):
    device = triton_backend
    img, text = _inputs(2, 640, 24, 24, 150, PROMPTS, torch.float16, device, generator)
    out = cost_map(img, text)
    _check(out, img, text, True, torch.float16, close_like_torch, "cost_map SED-B 24x24")


def test_equals_the_official_einsum(triton_backend, generator):
    """out[b*T + t, p] is the official einsum('bchw,btpc->bpthw') rearranged 'B P T H W -> (B T) P H W'."""
    device = triton_backend
    img, text = _inputs(2, 24, 3, 5, 4, 6, torch.float32, device, generator)
    official = torch.einsum("bchw,btpc->bpthw", F.normalize(img, dim=1),
                            F.normalize(text, dim=-1).unsqueeze(0).expand(2, -1, -1, -1))
    official = official.permute(0, 2, 1, 3, 4).reshape(8, 6, 3, 5)
    torch.testing.assert_close(cost_map(img, text), official, rtol=1e-5, atol=1e-6)


def test_non_contiguous_inputs(triton_backend, generator, close_like_torch):
    """Channels-last and sliced image features, a transposed text view: all accepted."""
    device = triton_backend
    img, text = _inputs(2, 40, 6, 9, 5, 12, torch.float32, device, generator)
    channels_last_img = img.contiguous(memory_format=torch.channels_last)
    sliced_img = img[:, :, 1:, ::2]  # h and w no longer flatten: copied
    text_view = text.transpose(0, 1).contiguous().transpose(0, 1)  # (T, P, D) view, P-major memory
    for image in (channels_last_img, sliced_img):
        out = cost_map(image, text_view, channels_last=True)
        close_like_torch(out, cost_map_reference(image.contiguous(), text), None, torch.float32, "strided")


def test_zero_features_give_zero_cosine(triton_backend):
    """F.normalize semantics: a zero vector stays zero (norm clamped to 1e-12), no NaN."""
    device = triton_backend
    img = torch.randn(1, 16, 2, 3, device=device)
    img[0, :, 1, 2] = 0
    text = torch.randn(3, 4, 16, device=device)
    text[1, 2] = 0
    out = cost_map(img, text)
    assert torch.isfinite(out).all()
    assert (out[:, :, 1, 2] == 0).all() and (out[1, 2] == 0).all()
    torch.testing.assert_close(out, cost_map_reference(img, text), rtol=1e-5, atol=1e-6)


def test_empty_batch_and_pixels():
    text = torch.randn(3, 4, 8)
    assert cost_map(torch.randn(0, 8, 3, 3), text).shape == (0, 4, 3, 3)
    assert cost_map(torch.randn(2, 8, 0, 3), text).shape == (6, 4, 0, 3)


@pytest.mark.parametrize("img_shape, text_shape, dtypes, error, match", [
    ((8, 3, 3), (2, 4, 8), None, ValueError, r"img_feats must be \(B, D, h, w\)"),
    ((1, 8, 3, 3), (4, 8), None, ValueError, r"text must be \(T, P, D\)"),
    ((1, 8, 3, 3), (2, 4, 9), None, ValueError, "feature dims differ"),
    ((1, 8, 3, 3), (0, 4, 8), None, ValueError, "T = 0"),
    ((1, 8, 3, 3), (2, 4, 8), (torch.float32, torch.float16), TypeError, "same dtype"),
    ((1, 8, 3, 3), (2, 4, 8), (torch.float64, torch.float64), TypeError, "supports float32"),
    ((1, 8, 3, 3), (2, 4, 8), (torch.int32, torch.int32), TypeError, "supports float32"),
])
def test_bad_inputs(img_shape, text_shape, dtypes, error, match):
    img_dtype, text_dtype = dtypes or (torch.float32, torch.float32)
    with pytest.raises(error, match=match):
        cost_map(torch.ones(img_shape, dtype=img_dtype), torch.ones(text_shape, dtype=text_dtype))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs a CUDA device")
def test_device_mismatch():
    with pytest.raises(ValueError, match="same device"):
        cost_map(torch.randn(1, 8, 3, 3, device="cuda"), torch.randn(2, 4, 8))


@pytest.mark.interpreter
def test_opcheck(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    img, text = torch.randn(2, 24, 3, 5), torch.randn(3, 7, 24)
    for channels_last in (True, False):
        torch.library.opcheck(torch.ops.sed_fast.cost_map.default, (img, text, channels_last))


def test_torch_compile():
    """The op composes with torch.compile (inductor, fullgraph): on CPU the torch path runs inside."""
    torch._dynamo.reset()

    def decode(img, text):
        return torch.relu(cost_map(img, text, channels_last=True)) * 2.0

    img, text = torch.randn(2, 24, 3, 5), torch.randn(3, 7, 24)
    compiled = torch.compile(decode, backend="inductor", fullgraph=True)
    torch.testing.assert_close(compiled(img, text), decode(img, text))


def test_reference_bounds_its_text_memory(monkeypatch, generator):
    """The torch path (what CPU runs) normalises the text a chunk of classes at a time: its memory
    beyond the output does not grow with T, and chunking does not change the result."""
    module = importlib.import_module("sed_fast.kernels.cost_map")  # the package exports a function of that name

    img = torch.randn(2, 24, 3, 5, generator=generator)
    text = torch.randn(37, 6, 24, generator=generator)
    whole = module.cost_map_reference(img, text)
    seen = []
    real_normalize = module.F.normalize

    def recording_normalize(x, *args, **kwargs):
        seen.append(x.numel() * x.element_size())
        return real_normalize(x, *args, **kwargs)

    chunk = 5 * 6 * 24 * 4  # five classes of float32 text
    monkeypatch.setattr(module, "REFERENCE_TEXT_CHUNK_BYTES", chunk)
    monkeypatch.setattr(module.F, "normalize", recording_normalize)
    for channels_last in (True, False):
        chunked = module.cost_map_reference(img, text, channels_last=channels_last)
        assert torch.allclose(chunked, whole, atol=1e-6)
    text_chunks = [n for n in seen if n != img.numel() * 4]
    assert text_chunks and max(text_chunks) <= chunk
