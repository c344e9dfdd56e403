"""The official test-time pipeline on raw images, list input and labels without full-size scores,
for the reference and the fast model (CPU, random weights, clip_resolution 64)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sed_fast
from sed_fast.inputs.images import PixelRangeWarning
from sed_fast.models.fast import SEDFast
from sed_fast.models.sed import NonFiniteScoresError, labels_from_scores
from sed_fast.inputs.preprocess import official_resize_shape

pytestmark = pytest.mark.filterwarnings("ignore::sed_fast.RandomWeightsWarning")

VOCAB = ["cat", "dog", "grass", "sky"]


@pytest.fixture(scope="module")
def models():
    reference = sed_fast.build_sed("b", impl="reference", device="cpu", clip_resolution=64)
    reference.set_vocabulary(VOCAB)
    return {"reference": reference, "fast": SEDFast.from_reference(reference)}


def _raw(height, width, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


def _pil_resized(image):
    new_h, new_w = official_resize_shape(*image.shape[-2:])
    pil = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((new_w, new_h), Image.BILINEAR)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("size", [(45, 70), (700, 50), (33, 33)])
def test_official_preprocess_equals_pil_resize_then_the_model(models, impl, size):
    """preprocess="official" on a raw image == PIL's resize by hand, preprocess="none", and the
    scores resized back to the original size (sem_seg_postprocess)."""
    model = models[impl]
    image = _raw(*size, seed=sum(size))
    official = model(image)
    assert official.shape == (1, len(VOCAB), *size)
    model.preprocess = "none"
    try:  # the decoder's (T, 192, 192)-style output of the hand-resized image, resized once to size
        manual = model._run(sed_fast.inputs.images.as_image_list(_pil_resized(image)))
    finally:
        model.preprocess = "official"
    by_hand = F.interpolate(manual, size=size, mode="bilinear", align_corners=False)
    assert (official - by_hand).abs().max().item() <= 1e-5


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_list_input_equals_one_call_per_image(models, impl):
    model = models[impl]
    images = [_raw(40, 52, 1), _raw(90, 37, 2), _raw(64, 64, 3).float()]
    together = model(images)
    assert isinstance(together, list) and len(together) == 3
    for image, scores in zip(images, together):
        alone = model(image)[0]
        assert scores.shape == (len(VOCAB), *image.shape[-2:])
        assert (scores - alone).abs().max().item() <= 1e-5


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_predict_labels_equals_argmax_of_the_scores(models, impl):
    model = models[impl]
    images = [_raw(41, 77, 4), _raw(120, 36, 5)]
    scores = model(images)
    labels, best = model.predict_labels(images, return_scores=True)
    for s, lab, b in zip(scores, labels, best):
        assert lab.dtype == torch.int64 and lab.shape == s.shape[-2:]
        assert torch.equal(lab, s.argmax(0))
        assert torch.equal(b, s.max(0).values)
    batch = torch.stack([_raw(50, 60, 6), _raw(50, 60, 7)])
    assert torch.equal(model.predict_labels(batch), model(batch).argmax(1))


def test_labels_from_scores_chunks_keep_the_first_class_on_ties():
    torch.manual_seed(0)
    scores = torch.rand(7, 12, 12)
    scores[3] = scores[1]  # an exact tie: class 1 must win
    scores[5] = 0.0
    full = F.interpolate(scores[None], size=(37, 29), mode="bilinear", align_corners=False)[0]
    for chunk in (1, 2, 3, 7 * 37 * 29 * 4):
        labels, best = labels_from_scores(scores, (37, 29), chunk_bytes=chunk * 37 * 29 * 4)
        assert torch.equal(labels, full.argmax(0)) and torch.equal(best, full.max(0).values)
        assert not (labels == 3).any()


def test_bad_inputs(models):
    model = models["reference"]
    with pytest.raises(ValueError, match="empty batch"):
        model(torch.zeros(0, 3, 40, 40))
    with pytest.raises(ValueError, match="empty list"):
        model([])
    with pytest.raises(ValueError, match=r"images\[1\].*3 RGB channels"):
        model([_raw(40, 40, 0), torch.zeros(1, 40, 40)])
    with pytest.raises(ValueError, match="0..255"):
        model(torch.full((3, 40, 40), -20.0))
    with pytest.raises(ValueError, match="0..255"):
        model(torch.full((3, 40, 40), 1000.0))
    with pytest.warns(PixelRangeWarning, match="multiply by 255"):
        model(torch.rand(3, 40, 40))


def test_scores_that_cannot_fit_fail_before_any_work(models, monkeypatch):
    model = models["reference"]
    monkeypatch.setattr(sed_fast.models.sed, "_available_bytes", lambda device: 1000)
    called = []
    monkeypatch.setattr(model, "segment", lambda clip: called.append(1))
    with pytest.raises(MemoryError, match="predict_labels"):
        model(_raw(40, 40, 0))
    assert not called


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_non_finite_weights_raise_instead_of_scoring(impl):
    model = sed_fast.build_sed("b", impl=impl, device="cpu", clip_resolution=64)
    model.set_vocabulary(["cat", "dog"])
    with torch.no_grad():
        model.decoder.head.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteScoresError, match="NaN or infinite"):
        model(_raw(40, 40, 0))


def test_when_pixel_values_are_checked(models, monkeypatch):
    """The reference checks pixel values before any work; the fast model after the forward (no
    early host sync), or not at all with validate_inputs=False."""
    bad = torch.full((3, 40, 40), 1000.0)
    reference, fast = models["reference"], models["fast"]
    ran = []
    real_segment = reference.segment
    monkeypatch.setattr(reference, "segment", lambda clip: ran.append("reference") or real_segment(clip))
    with pytest.raises(ValueError, match="0..255"):
        reference(bad)
    assert ran == []
    real_fast_segment = fast.segment
    monkeypatch.setattr(fast, "segment", lambda clip: ran.append("fast") or real_fast_segment(clip))
    with pytest.raises(ValueError, match="0..255"):
        fast(bad)
    assert ran == ["fast"]
    fast.validate_inputs = False
    try:
        assert fast(bad).shape == (1, len(VOCAB), 40, 40)
    finally:
        fast.validate_inputs = True


@pytest.mark.parametrize("classes, size, chunk", [(3, (37, 29), 10 ** 9), (7, (37, 29), 1), (5, (40, 33), 2),
                                                  (300, (9, 11), 10 ** 9), (300, (9, 11), 7)])
def test_labels_from_scores_compact_dtype_and_bands(classes, size, chunk, monkeypatch):
    """Labels in the smallest dtype until int64 is asked for; one class plane at a time with band-wise
    comparisons (as for a large image) gives exactly the argmax of F.interpolate."""
    import sed_fast.models.sed as sed

    torch.manual_seed(classes)
    scores = torch.rand(classes, 12, 10)
    scores[classes - 1] = scores[0]  # an exact tie across chunks: class 0 must win
    monkeypatch.setattr(sed, "_LABEL_BAND_ELEMENTS", 64)  # several bands per plane
    for large in (False, True):
        # What the chunks hold: on CPU, F.interpolate of one channel may differ by an ulp from the same
        # channel interpolated together with others (its vectorised paths differ), as chunking always did.
        step = 1 if large else min(classes, chunk)
        full = torch.cat([F.interpolate(scores[None, c:c + step], size=size, mode="bilinear", align_corners=False)[0]
                          for c in range(0, classes, step)])
        monkeypatch.setattr(sed, "LARGE_LABEL_PIXELS", 1 if large else 8 << 20)
        labels, best = labels_from_scores(scores, size, chunk_bytes=chunk * size[0] * size[1] * 4, label_dtype=None)
        assert labels.dtype == (torch.uint8 if classes <= 256 else torch.int16)
        assert torch.equal(labels.long(), full.argmax(0)) and torch.equal(best, full.max(0).values)
        wide, _ = labels_from_scores(scores, size, chunk_bytes=chunk * size[0] * size[1] * 4)
        assert wide.dtype == torch.int64 and torch.equal(wide, full.argmax(0))


def test_predict_labels_compact_dtype(models):
    model = models["reference"]
    image = _raw(41, 77, 4)
    labels = model.predict_labels([image], label_dtype=None)[0]
    assert labels.dtype == torch.uint8 and torch.equal(labels.long(), model.predict_labels([image])[0])


def test_meta_tensor_is_refused_naming_the_device(models):
    with pytest.raises(ValueError, match="meta device"):
        models["reference"](torch.empty(3, 40, 40, device="meta"))
