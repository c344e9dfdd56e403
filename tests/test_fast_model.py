"""The fast model against the reference, on CPU (kernel ops run their PyTorch fallbacks here;
tests/kernels checks each Triton kernel against the same fallbacks under the interpreter)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import sed_fast
from sed_fast.inputs.images import as_image_list
from sed_fast.bench.instrument import ForcedKeep
from sed_fast.models.fast import SEDFast
from sed_fast.models.rejection import rule_for_topk

pytestmark = pytest.mark.filterwarnings("ignore::sed_fast.RandomWeightsWarning")

NUM_CLASSES = 9


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = sed_fast.build_sed("b", impl="reference", device="cpu", clip_resolution=64)
    # Random unit text embeddings stand in for a vocabulary: the text tower is tested elsewhere.
    model.text_embeddings = F.normalize(torch.randn(NUM_CLASSES, 80, 640), dim=-1)
    model.class_names = [f"class{i}" for i in range(NUM_CLASSES)]
    return model


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.rand(3, 3, 45, 38) * 255


def _run(model, images, cer_topk=None, force=None):
    model.rejection = ForcedKeep(force) if force is not None else rule_for_topk(cer_topk)
    try:
        return model(images)
    finally:
        model.rejection = None


def _kept(scores):
    return scores.flatten(2).amax(2) > 0  # (B, T)


def test_fast_shares_weights_and_state_dict_layout(reference):
    fast = SEDFast.from_reference(reference)
    assert list(fast.state_dict()) == list(reference.state_dict())
    assert fast.decoder.conv1.weight.data_ptr() == reference.decoder.conv1.weight.data_ptr()


def test_exact_decoding_matches_reference(reference, images):
    fast = SEDFast.from_reference(reference)
    expected = _run(reference, images)
    got = _run(fast, images)
    assert got.shape == expected.shape == (3, NUM_CLASSES, 45, 38)
    assert (got - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("k", [1, 2, 4])
def test_rejection_matches_reference_per_image(reference, images, k):
    fast = SEDFast.from_reference(reference)
    expected = _run(reference, images, cer_topk=k)
    got = _run(fast, images, cer_topk=k)
    assert torch.equal(_kept(got), _kept(expected))
    assert (got - expected).abs().max() <= 1e-4
    assert torch.all(got[~_kept(got)] == 0)


def test_batched_rejection_with_different_kept_sets_equals_each_image_alone(reference, images):
    fast = SEDFast.from_reference(reference)
    batched = _run(fast, images, cer_topk=1)
    kept = _kept(batched)
    assert not all(torch.equal(kept[0], kept[b]) for b in range(1, kept.shape[0])), \
        "test needs images that keep different class sets"
    for b in range(images.shape[0]):
        alone = _run(fast, images[b:b + 1], cer_topk=1)
        assert (batched[b] - alone[0]).abs().max() <= 1e-5


def test_forced_kept_classes_matches_reference(reference, images):
    fast = SEDFast.from_reference(reference)
    expected = _run(reference, images, force=3)
    got = _run(fast, images, force=3)
    assert (_kept(got).sum(1) == 3).all()
    assert torch.equal(_kept(got), _kept(expected))
    assert (got - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("cer_topk", [None, 2])
def test_chunked_decoding_equals_unchunked(reference, images, cer_topk):
    whole = SEDFast.from_reference(reference, chunk_bytes=1 << 40)
    chunked = SEDFast.from_reference(reference, chunk_bytes=1 << 14)  # one row / few pixels per chunk
    assert (_run(chunked, images, cer_topk) - _run(whole, images, cer_topk)).abs().max() <= 1e-5


def test_cpu_linears_go_through_onednn_and_match(reference, images, monkeypatch):
    """On CPU the encoder's and decoder's float32 linears take the oneDNN path (when this torch has
    it), and the scores still equal the reference's (which runs F.linear) to float32 rounding."""
    from sed_fast.kernels import cpu_linear
    routed = []
    real = cpu_linear.linear
    monkeypatch.setattr(cpu_linear, "linear", lambda *a, **k: routed.append(cpu_linear.routed(*a)) or real(*a, **k))
    fast = SEDFast.from_reference(reference)
    expected = _run(reference, images)
    assert not routed  # the reference never calls it
    got = _run(fast, images)
    assert (got - expected).abs().max() <= 1e-4
    if cpu_linear.onednn_linear_usable():
        assert len(routed) > 20 and all(routed)


def test_chunk_budget_from_environment(reference, monkeypatch):
    fast = SEDFast.from_reference(reference)
    monkeypatch.setenv("SED_FAST_CHUNK_MB", "3")
    assert fast._budget(torch.device("cpu")) == 3 << 20
    monkeypatch.setenv("SED_FAST_CHUNK_MB", "zero")
    with pytest.raises(ValueError, match="SED_FAST_CHUNK_MB"):
        fast._budget(torch.device("cpu"))


def _text_from_image_features(model, images, num_classes):
    """Class embeddings drawn from the images' own dense features (plus noise): classes that are
    present in the images, so that even random weights give scores with real margins between
    classes (random text embeddings leave every class nearly tied)."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        dense, _ = model.encode_image(model.clip_input(as_image_list(images)))
    features = dense.permute(0, 2, 3, 1).reshape(-1, dense.shape[1])
    picks = features[torch.randperm(features.shape[0], generator=generator)[:num_classes]]
    noise = torch.randn(num_classes, 80, features.shape[1], generator=generator)
    return F.normalize(picks[:, None, :] + 0.3 * features.std() * noise, dim=-1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_the_reference_error(reference, images, dtype):
    """Judged against the error the reference itself makes in the same dtype; label agreement is
    measured on the pixels whose float32 top-2 margin is over 4x the reference's own rounding error
    at that pixel in that dtype (elsewhere the label is a coin toss at that precision)."""
    reference = copy.deepcopy(reference)
    reference.text_embeddings = _text_from_image_features(reference, images, NUM_CLASSES)
    expected = _run(reference, images)
    reference_low = copy.deepcopy(reference).to(dtype)
    fast_low = SEDFast.from_reference(reference_low)
    reference_pixel_error = (_run(reference_low, images) - expected).abs().amax(1)  # (B, H, W)
    reference_error = reference_pixel_error.max().item()
    got = _run(fast_low, images)
    error = (got - expected).abs().max().item()
    assert got.dtype == torch.float32
    assert error <= 2 * reference_error + 1e-3
    top2 = expected.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > 4 * reference_pixel_error
    assert decided.float().mean() >= 0.2, "too few decided pixels for a meaningful check"
    agreement = (got.argmax(1) == expected.argmax(1))[decided].float().mean()
    print(f"{dtype}: max error {error:.2e} (reference {reference_error:.2e}), "
          f"{decided.float().mean():.1%} decided pixels, agreement {agreement:.2%}")
    assert agreement >= 0.99


def test_fast_validates_input_like_the_reference(reference):
    fast = SEDFast.from_reference(reference)
    bad = torch.rand(1, 3, 40, 40) * 255
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        fast(bad)
    with pytest.raises(ValueError, match="3 RGB channels"):
        fast(torch.rand(1, 4, 40, 40))


def test_build_sed_fast_loads_the_same_checkpoint(reference, images, tmp_path):
    path = tmp_path / "ckpt.pth"
    sed_fast.save_checkpoint(reference, path)
    fast = sed_fast.build_sed("b", impl="fast", device="cpu", clip_resolution=64, checkpoint=path)
    assert isinstance(fast, SEDFast) and fast.random_weights is False
    fast.text_embeddings, fast.class_names = reference.text_embeddings, reference.class_names
    assert (_run(fast, images) - _run(reference, images)).abs().max() <= 1e-4


def test_fast_rejects_training_pooling():
    from sed_fast.models.encoder import variant_spec
    from sed_fast.models.sed import SEDReference
    ref = SEDReference(variant_spec("b"), pooling_size=(2, 2), device="meta", clip_resolution=64)
    with pytest.raises(ValueError, match="pooling"):
        SEDFast.from_reference(ref)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("cer_topk", [None, 1, 8])
def test_cuda_fast_matches_reference(reference, images, cer_topk):
    cuda_reference = copy.deepcopy(reference).cuda()
    fast = SEDFast.from_reference(cuda_reference)
    expected = _run(cuda_reference, images.cuda(), cer_topk)
    got = _run(fast, images.cuda(), cer_topk)
    assert torch.equal(_kept(got), _kept(expected))
    assert (got - expected).abs().max() <= 1e-4


@requires_cuda
@pytest.mark.gpu
def test_cuda_graph_encoder_replays_the_same_result(reference, images):
    cuda_reference = copy.deepcopy(reference).cuda()
    eager = SEDFast.from_reference(cuda_reference)
    graphed = SEDFast.from_reference(cuda_reference, cuda_graphs=True)
    first = _run(graphed, images.cuda())     # captures
    second = _run(graphed, images.cuda().flip(-1))  # replays with new input
    assert (first - _run(eager, images.cuda())).abs().max() <= 1e-5
    assert (second - _run(eager, images.cuda().flip(-1))).abs().max() <= 1e-5


def test_fused_weights_follow_the_weights(reference, images):
    """The fast layers' fused qkv and split DoubleConv weights are derived once, and derived again
    when the weights change in place (load_state_dict): the fast model then equals a reference
    with the new weights."""
    fast = SEDFast.from_reference(copy.deepcopy(reference))
    layer = fast.decoder.decoder1
    before = layer.attention._qkv(*(p for m in (layer.attention.attention.q, layer.attention.attention.k,
                                                layer.attention.attention.v) for p in (m.weight, m.bias)))
    _run(fast, images)
    again = layer.attention._qkv(*(p for m in (layer.attention.attention.q, layer.attention.attention.k,
                                               layer.attention.attention.v) for p in (m.weight, m.bias)))
    assert again[0] is before[0], "derived weights must be kept while the weights do not change"
    torch.manual_seed(7)
    other = sed_fast.build_sed("b", impl="reference", device="cpu", clip_resolution=64, seed=7)
    other.text_embeddings, other.class_names = reference.text_embeddings, reference.class_names
    fast.load_state_dict(other.state_dict())
    assert (_run(fast, images) - _run(other, images)).abs().max() <= 1e-4
