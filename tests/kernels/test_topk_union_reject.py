"""topk_union_reject and gather_rows: the Triton kernels against the official argsort + bincount rule."""
from __future__ import annotations

import pytest
import torch

from sed_fast.kernels import gather_rows, gather_rows_reference, topk_union_reject, topk_union_reject_reference
from sed_fast.models.rejection import TopKUnion

INF = float("inf")


def _tie_free(batch, classes, height, width, dtype, device, generator):
    """Every pixel's logits are a random permutation of 0..T-1 (FlagGems' shuffled arange): no ties,
    exact in every dtype used here (T <= 256 for bfloat16, <= 2048 for float16)."""
    order = torch.rand(batch, classes, height, width, generator=generator).argsort(dim=1)
    return order.to(device=device, dtype=dtype)


def _official_kept(aux, k):
    """The official rule per image (argsort over the present classes only): (B, T) bool."""
    kept = torch.zeros(aux.shape[:2], dtype=torch.bool)
    for b in range(aux.shape[0]):
        present = torch.isfinite(aux[b].float()).flatten(1).all(1).nonzero()[:, 0].cpu()
        if len(present):
            kept[b, present] = TopKUnion(k).keep_mask(aux[b:b + 1, present.to(aux.device)].float()).cpu()
    return kept


def _expected_index_outputs(kept):
    """flat_idx and class_offsets that kept (B, T) implies, built the slow, obvious way."""
    batch, classes = kept.shape
    flat = [b * classes + t for b in range(batch) for t in range(classes) if kept[b, t]]
    flat_idx = torch.full((batch * classes,), -1, dtype=torch.int32)
    flat_idx[:len(flat)] = torch.tensor(flat, dtype=torch.int32)
    offsets = torch.tensor([0] + kept.sum(1).cumsum(0).tolist(), dtype=torch.int32)
    return flat_idx, offsets


def _assert_outputs(got, kept_expected):
    kept, flat_idx, offsets = (t.cpu() for t in got)
    assert kept.dtype == torch.bool and flat_idx.dtype == torch.int32 and offsets.dtype == torch.int32
    assert torch.equal(kept, kept_expected)
    flat_expected, offsets_expected = _expected_index_outputs(kept_expected)
    assert torch.equal(flat_idx, flat_expected)
    assert torch.equal(offsets, offsets_expected)


@pytest.mark.parametrize("k", [1, 3, 16])
@pytest.mark.parametrize("classes", [1, 7, 150], ids=lambda t: f"T{t}")
def test_tie_free_equals_official(triton_backend, dtype, classes, k, generator, poisoned_empty):
    device = triton_backend
    aux = _tie_free(3, classes, 5, 6, dtype, device, generator)
    got = topk_union_reject(aux, k)
    _assert_outputs(got, _official_kept(aux, k))
    for g, e in zip(got, topk_union_reject_reference(aux, k)):
        assert torch.equal(g.cpu(), e.cpu())


def test_vocabulary_size_847(triton_backend, generator, poisoned_empty):
    device = triton_backend
    aux = _tie_free(2, 847, 4, 5, torch.float16, device, generator)
    _assert_outputs(topk_union_reject(aux, 8), _official_kept(aux, 8))


@pytest.mark.slow
def test_model_shapes(triton_backend, generator):
    device = triton_backend
    aux = torch.randn(2, 847, 24, 24, generator=generator).to(device, torch.float16)
    for g, e in zip(topk_union_reject(aux, 8), topk_union_reject_reference(aux, 8)):
        assert torch.equal(g.cpu(), e.cpu())


def test_ties_at_the_kth_place_are_all_kept(triton_backend, poisoned_empty):
    """Pixel 0: [3, 2, 2, 1] with k=2 keeps classes 0, 1 and 2 (both tie at the 2nd place).
    Pixel 1: [5, 5, 5, 0] with k=1 keeps 0, 1, 2. Class 3 is never kept."""
    device = triton_backend
    aux = torch.tensor([[3.0, 5.0], [2.0, 5.0], [2.0, 5.0], [1.0, 0.0]], device=device).view(1, 4, 1, 2)
    kept, flat_idx, offsets = topk_union_reject(aux, 2)
    assert kept.cpu().tolist() == [[True, True, True, False]]
    assert flat_idx.cpu().tolist() == [0, 1, 2, -1] and offsets.cpu().tolist() == [0, 3]
    kept, _, _ = topk_union_reject(aux[:, :, :, 1:], 1)
    assert kept.cpu().tolist() == [[True, True, True, False]]


def test_random_ties_match_reference(triton_backend, dtype, generator, poisoned_empty):
    """Few integer levels: many ties at the k-th place; kernel == reference, and a superset of the
    official argsort choice."""
    device = triton_backend
    aux = torch.randint(-3, 4, (2, 37, 7, 5), generator=generator).to(device, dtype)
    for k in (1, 4, 9):
        got = topk_union_reject(aux, k)
        for g, e in zip(got, topk_union_reject_reference(aux, k)):
            assert torch.equal(g.cpu(), e.cpu())
        official = _official_kept(aux, k)
        assert (got[0].cpu() | ~official).all()


def test_minus_inf_classes_are_absent(triton_backend, generator, poisoned_empty):
    """-inf: an absent class, never kept, takes no top-k place; a pixel with fewer than k present
    classes keeps all of them. Equals the official rule run on the present classes only."""
    device = triton_backend
    aux = _tie_free(3, 20, 4, 3, torch.float32, device, generator)
    aux[0, ::2] = -INF  # image 0: half of the classes already rejected
    aux[1, 3:] = -INF  # image 1: 3 classes left, fewer than k
    aux[2] = -INF  # image 2: nothing left
    aux[2, 7] = 1.0
    k = 5
    kept, flat_idx, offsets = topk_union_reject(aux, k)
    _assert_outputs((kept, flat_idx, offsets), _official_kept(aux, k))
    assert kept[1].cpu().tolist() == [True] * 3 + [False] * 17
    assert kept[2].cpu().nonzero().flatten().tolist() == [7]
    assert not kept[0, ::2].any()


def test_nan_and_plus_inf(triton_backend, poisoned_empty):
    """NaN is treated like -inf (never kept); +inf is an ordinary, largest value."""
    device = triton_backend
    aux = torch.tensor([[float("nan"), 1.0], [INF, 0.0], [0.5, float("nan")], [0.0, 2.0]], device=device)
    kept, _, offsets = topk_union_reject(aux.view(1, 4, 1, 2), 1)
    assert kept.cpu().tolist() == [[False, True, False, True]] and offsets.cpu().tolist() == [0, 2]
    kept_ref, _, _ = topk_union_reject_reference(aux.view(1, 4, 1, 2), 1)
    assert torch.equal(kept.cpu(), kept_ref.cpu())


def test_k_larger_than_t_keeps_every_present_class(triton_backend, generator, poisoned_empty):
    device = triton_backend
    aux = torch.randn(2, 6, 3, 3, generator=generator).to(device)
    aux[1, 4] = -INF
    kept, flat_idx, offsets = topk_union_reject(aux, 40)
    assert kept.cpu().tolist() == [[True] * 6, [True] * 4 + [False, True]]
    assert offsets.cpu().tolist() == [0, 6, 11]
    assert flat_idx.cpu().tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, -1]


def test_non_contiguous_logits(triton_backend, generator):
    device = triton_backend
    base = torch.randn(2, 30, 9, 8, generator=generator).to(device)
    for aux in (base[:, ::2, 1:, :], base[:, :, :, ::2], base.transpose(2, 3)):
        for g, e in zip(topk_union_reject(aux, 3), topk_union_reject_reference(aux.contiguous(), 3)):
            assert torch.equal(g.cpu(), e.cpu())


def test_empty_batch_or_pixels():
    kept, flat_idx, offsets = topk_union_reject(torch.randn(2, 5, 0, 3), 2)
    assert not kept.any() and (flat_idx == -1).all() and offsets.tolist() == [0, 0, 0]
    kept, flat_idx, offsets = topk_union_reject(torch.randn(0, 5, 3, 3), 2)
    assert kept.shape == (0, 5) and flat_idx.numel() == 0 and offsets.tolist() == [0]


@pytest.mark.parametrize("aux, k, error, match", [
    (torch.randn(3, 4, 4), 2, ValueError, r"\(B, T, h, w\)"),
    (torch.randn(1, 0, 4, 4), 2, ValueError, "T = 0"),
    (torch.randn(1, 5, 4, 4), 0, ValueError, "k must be >= 1"),
    (torch.randn(1, 5, 4, 4), -3, ValueError, "k must be >= 1"),
    (torch.randn(1, 5, 4, 4), 2.0, TypeError, "k must be an int"),
    (torch.randn(1, 5, 4, 4), True, TypeError, "k must be an int"),
    (torch.randn(1, 5, 4, 4).double(), 2, TypeError, "supports float32"),
    (torch.ones(1, 5, 4, 4, dtype=torch.int32), 2, TypeError, "supports float32"),
])
def test_bad_inputs(aux, k, error, match):
    with pytest.raises(error, match=match):
        topk_union_reject(aux, k)


# -- gather_rows -------------------------------------------------------------------------------------
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_gather_rows(triton_backend, dtype, memory_format, index_dtype, generator, poisoned_empty):
    device = triton_backend
    x = torch.randn(12, 5, 7, 3, generator=generator).to(device, dtype).contiguous(memory_format=memory_format)
    flat_idx = torch.tensor([11, 0, 4, 4, 7, -1, -1], dtype=index_dtype, device=device)
    out = gather_rows(x, flat_idx, 5)
    assert out.shape == (5, 5, 7, 3) and out.dtype == dtype
    assert out.is_contiguous(memory_format=memory_format)
    assert torch.equal(out.cpu(), x.cpu()[[11, 0, 4, 4, 7]])
    assert torch.equal(out.cpu(), gather_rows_reference(x, flat_idx, 5).cpu())


def test_gather_rows_after_rejection(triton_backend, generator, poisoned_empty):
    """The model's use: gather the kept classes' rows with the flat_idx / offsets of a rejection."""
    device = triton_backend
    aux = _tie_free(2, 9, 3, 3, torch.float32, device, generator)
    _, flat_idx, offsets = topk_union_reject(aux, 2)
    total = int(offsets[-1])
    x = torch.randn(18, 4, 3, 3, generator=generator).to(device).contiguous(memory_format=torch.channels_last)
    out = gather_rows(x, flat_idx, total)
    assert torch.equal(out.cpu(), x.cpu()[flat_idx[:total].long().cpu()])


def test_gather_rows_strided_sources(triton_backend, generator):
    device = triton_backend
    base = torch.randn(10, 6, 4, 5, generator=generator).to(device)
    flat_idx = torch.tensor([3, 1, 2], device=device)
    for x in (base[::2], base[:, ::2], base.transpose(2, 3), base[:, 0]):
        out = gather_rows(x, flat_idx, 3)
        assert torch.equal(out.cpu(), x.cpu()[[3, 1, 2]])


def test_gather_rows_zero_rows_and_out_of_range(triton_backend):
    device = triton_backend
    x = torch.randn(4, 3, device=device)
    assert gather_rows(x, torch.tensor([1, 2], device=device), 0).shape == (0, 3)
    # The Triton path does not sync to check indices: an out-of-range row reads as zeros.
    out = gather_rows(x, torch.tensor([1, 9], device=device), 2)
    assert torch.equal(out.cpu(), torch.stack([x[1].cpu(), torch.zeros(3)]))


@pytest.mark.parametrize("args, error, match", [
    ((torch.randn(4, 3), torch.tensor([[0]]), 1), ValueError, "1-D"),
    ((torch.randn(4, 3), torch.tensor([0.0]), 1), TypeError, "int32 or int64"),
    ((torch.randn(4, 3), torch.tensor([0, 1]), 3), ValueError, "between 0 and"),
    ((torch.randn(4, 3), torch.tensor([0, 1]), -1), ValueError, "between 0 and"),
    ((torch.randn(4, 3), torch.tensor([0, 1]), 1.0), TypeError, "total must be an int"),
])
def test_gather_rows_bad_inputs(args, error, match):
    with pytest.raises(error, match=match):
        gather_rows(*args)


@pytest.mark.interpreter
def test_opcheck(monkeypatch, generator):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    aux = torch.randn(2, 9, 3, 4, generator=generator)
    torch.library.opcheck(torch.ops.sed_fast.topk_union_reject.default, (aux, 3))
    x = torch.randn(6, 4, 3, 5, generator=generator).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.sed_fast.gather_rows.default, (x, torch.tensor([5, 0, 2], dtype=torch.int32), 2))


def test_torch_compile(generator):
    torch._dynamo.reset()

    def reject_and_gather(aux, x):
        kept, flat_idx, offsets = topk_union_reject(aux, 2)
        return kept, gather_rows(x, flat_idx, 4), offsets

    aux = torch.randn(2, 5, 3, 3, generator=generator)
    x = torch.randn(10, 4, 3, 3, generator=generator)
    compiled = torch.compile(reject_and_gather, backend="inductor", fullgraph=True)
    for g, e in zip(compiled(aux, x), reject_and_gather(aux, x)):
        assert torch.equal(g, e)
