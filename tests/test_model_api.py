"""The public API end to end: build_sed + set_vocabulary + model(images), and bad input."""
import pytest
import torch

import sed_fast

pytestmark = pytest.mark.filterwarnings("ignore::sed_fast.RandomWeightsWarning")

VOCAB = ["cat", "dog, puppy", "grass"]  # a synonym list included


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = sed_fast.build_sed("b", device="cpu", clip_resolution=64)
    m.set_vocabulary(VOCAB)
    return m


def test_random_weights_are_announced():
    with pytest.warns(sed_fast.RandomWeightsWarning, match="RANDOM weights"):
        model = sed_fast.build_sed("b", device="meta")
    assert model.random_weights is True


def test_end_to_end_scores(model):
    assert model.class_names == VOCAB
    assert model.text_embeddings.shape == (3, 80, 640)
    # unit norm per prompt (synonyms averaged then re-normalised)
    assert torch.allclose(model.text_embeddings.norm(dim=-1), torch.ones(3, 80), atol=1e-5)
    torch.manual_seed(1)
    images = torch.rand(2, 3, 40, 52) * 255
    scores = model(images)
    assert scores.shape == (2, 3, 40, 52) and scores.dtype == torch.float32
    assert torch.all((scores >= 0) & (scores <= 1))
    # batch of two equals each image alone; (3, H, W) input is accepted
    assert torch.allclose(scores[1:], model(images[1]), atol=1e-5)


def test_uint8_input_equals_float_input_without_the_official_resize(model):
    images = torch.randint(0, 256, (1, 3, 33, 35), dtype=torch.uint8)
    model.preprocess = "none"
    try:
        assert torch.equal(model(images), model(images.float()))
    finally:
        model.preprocess = "official"
    # The official resize itself differs by dtype (PIL's antialiased uint8 filter vs bilinear
    # interpolation of floats), as in detectron2: a float image is never treated as uint8.
    assert not torch.equal(model(images), model(images.float()))


def test_rejection_gives_exact_zeros_for_rejected_classes(model):
    torch.manual_seed(3)
    images = torch.rand(1, 3, 48, 48) * 255
    model.cer_topk = 1
    try:
        scores = model(images)
    finally:
        model.cer_topk = None
    kept = scores[0].flatten(1).amax(1) > 0
    assert kept.any()
    assert torch.all(scores[0][~kept] == 0)


def test_official_resolution_end_to_end(model):
    """The official 768x768 encoder input (a few seconds on CPU)."""
    official = sed_fast.build_sed("b", device="cpu", checkpoint=model.state_dict() | {})
    official.set_vocabulary(VOCAB)  # same weights and names: the text cache hits
    assert torch.equal(official.text_embeddings, model.text_embeddings)
    scores = official(torch.rand(1, 3, 70, 90) * 255)
    assert scores.shape == (1, 3, 70, 90)


@pytest.mark.parametrize("images,error,match", [
    (torch.rand(1, 1, 40, 40), ValueError, "grayscale"),
    (torch.rand(1, 4, 40, 40), ValueError, "RGBA"),
    (torch.rand(1, 40, 40, 3), ValueError, "channels-last"),
    (torch.rand(40, 40), ValueError, r"\(B, 3, H, W\)"),
    (torch.rand(1, 1, 3, 40, 40), ValueError, r"\(B, 3, H, W\)"),
    (torch.rand(1, 3, 31, 64), ValueError, "at least 32x32"),
    (torch.zeros(1, 3, 40, 40, dtype=torch.int64), TypeError, "float"),
    ([[0.0]], TypeError, "torch.Tensor"),
])
def test_bad_images_are_clear_errors(model, images, error, match):
    with pytest.raises(error, match=match):
        model(images)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_pixels_are_refused(model, value):
    images = torch.rand(1, 3, 40, 40) * 255
    images[0, 2, 5, 7] = value
    with pytest.raises(ValueError, match="NaN or infinite"):
        model(images)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"variant": "xl"}, ValueError, "unknown SED variant"),
    ({"impl": "turbo"}, ValueError, "unknown impl"),
    ({"cer_topk": 0}, ValueError, "cer_topk must be >= 1"),
    ({"cer_topk": -3}, ValueError, "cer_topk must be >= 1"),
    ({"cer_topk": 2.5}, TypeError, "cer_topk"),
    ({"dtype": torch.int8}, ValueError, "dtype"),
    ({"clip_resolution": 100}, ValueError, "multiple of 32"),
])
def test_bad_build_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        sed_fast.build_sed(**{"variant": "b", "device": "meta", **kwargs})


@pytest.mark.parametrize("vocabulary,match", [
    ([], "empty"),
    (["cat", ""], "empty"),
    (["cat", 3], "str"),
    (["cat", "dog", "cat"], "duplicate"),
    ("no_such_vocabulary_name", "no_such_vocabulary_name"),
])
def test_bad_vocabularies_leave_the_model_unchanged(model, vocabulary, match):
    before = model.text_embeddings.clone()
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=match):
        model.set_vocabulary(vocabulary)
    assert model.class_names == VOCAB and torch.equal(model.text_embeddings, before)


def test_segmenting_without_vocabulary_is_a_clear_error():
    m = sed_fast.build_sed("b", device="cpu", clip_resolution=64)
    with pytest.raises(RuntimeError, match="set_vocabulary"):
        m(torch.rand(1, 3, 40, 40))


def test_random_weights_are_seeded_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = sed_fast.build_sed("b", device="cpu", clip_resolution=64)
    assert torch.equal(torch.get_rng_state(), before), "building a model must not move the caller's RNG"
    second = sed_fast.build_sed("b", device="cpu", clip_resolution=64, seed=sed_fast.api.DEFAULT_SEED)
    other = sed_fast.build_sed("b", device="cpu", clip_resolution=64, seed=1)
    a, b, c = first.state_dict(), second.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "the same seed must give the same weights"
    assert not all(torch.equal(a[k], c[k]) for k in a), "another seed must give other weights"
    with pytest.raises(TypeError, match="seed"):
        sed_fast.build_sed("b", device="meta", seed="0")
