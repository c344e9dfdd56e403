"""The reference decoder against outputs computed by the official SED code (fixture in tests/)."""
from pathlib import Path

import pytest
import torch

from sed_fast.models.decoder import SEDDecoder
from sed_fast.models.rejection import TopKUnion

GOLDEN = Path(__file__).parent / "official_decoder_golden.pt"


@pytest.fixture(scope="module")
def golden():
    data = torch.load(GOLDEN, weights_only=False)
    assert data["variant"] == "sed-b"
    return data


def _decoder(golden, pooling):
    decoder = SEDDecoder((512, 256, 128), pooling_size=pooling).eval()
    decoder.load_state_dict({k: v.float() for k, v in golden["decoder_state_dict"].items()}, strict=True)
    return decoder


def _inputs(golden, case):
    inputs = golden["inputs"][case["inputs"]]
    img = inputs["img_feats"].float()
    text = inputs["text_feats"].float()
    assert text.shape[0] == 1  # the official decoder repeats one text tensor over the batch
    guidance = [g.float() for g in inputs["guidance"]]
    return img, text[0], guidance


def _cases(kind):
    data = torch.load(GOLDEN, weights_only=False)
    return [pytest.param(c, id=c["name"]) for c in data["cases"] if (c["cer_topk"] is None) == (kind == "exact")]


@pytest.mark.parametrize("case", _cases("exact"))
def test_exact_decoding_matches_official(golden, case):
    decoder = _decoder(golden, case["pooling"])
    img, text, guidance = _inputs(golden, case)
    with torch.no_grad():
        logits, aux = decoder(img, text, guidance)
    assert logits.shape == case["logits"].shape
    assert (logits - case["logits"].float()).abs().max() <= 1e-4
    assert len(aux) == len(case["aux_logits"]) == 3
    for ours, theirs in zip(aux, case["aux_logits"]):
        assert ours.shape == theirs.shape
        assert (ours - theirs.float()).abs().max() <= 1e-4


@pytest.mark.parametrize("case", _cases("cer"))
def test_category_early_rejection_matches_official(golden, case):
    decoder = _decoder(golden, case["pooling"])
    img, text, guidance = _inputs(golden, case)
    with torch.no_grad():
        scores = decoder(img, text, guidance, rejection=TopKUnion(case["cer_topk"]))
    expected = case["scores"].float()
    assert scores.shape == expected.shape
    kept = scores[0].flatten(1).abs().amax(1) > 0
    expected_kept = expected[0].flatten(1).abs().amax(1) > 0
    assert int(expected_kept.sum()) == case["kept_classes"]
    assert torch.equal(kept, expected_kept)
    assert (scores - expected).abs().max() <= 1e-5
    assert torch.all(scores[0][~kept] == 0)


def test_pooling_changes_the_result(golden):
    """The fixture's two exact cases differ, so the pooling option is really exercised."""
    cases = {c["name"]: c for c in golden["cases"]}
    assert (cases["exact_pool1"]["logits"].float() - cases["exact_pool2"]["logits"].float()).abs().max() > 1e-3


def test_batched_rejection_equals_each_image_alone(golden):
    """Batch of two images, each keeps its own class set, equal to decoding it alone."""
    case = next(c for c in golden["cases"] if c["cer_topk"] == 1)
    decoder = _decoder(golden, case["pooling"])
    img, text, guidance = _inputs(golden, case)
    torch.manual_seed(1)
    img2 = torch.randn_like(img)
    guidance2 = [torch.randn_like(g) for g in guidance]
    with torch.no_grad():
        batched = decoder(torch.cat([img, img2]), text, [torch.cat(p) for p in zip(guidance, guidance2)],
                          rejection=TopKUnion(1))
        alone = [decoder(img, text, guidance, rejection=TopKUnion(1)),
                 decoder(img2, text, guidance2, rejection=TopKUnion(1))]
    assert batched.shape[0] == 2
    for b in range(2):
        assert torch.allclose(batched[b], alone[b][0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", _cases("cer"))
def test_static_budget_rejection_matches_official(golden, case):
    """The export's static-shape CER (padding + validity mask) reproduces the official kept sets and
    scores whenever the budget covers the kept set: at exactly its size, and padded beyond it."""
    decoder = _decoder(golden, case["pooling"])
    img, text, guidance = _inputs(golden, case)
    expected = case["scores"].float()
    kept_official = expected[0].flatten(1).abs().amax(1) > 0
    classes = text.shape[0]
    for budget in sorted({case["kept_classes"], min(classes, case["kept_classes"] + 3), classes}):
        with torch.no_grad():
            scores, counts = decoder.rejecting_with_budget(img, text, guidance, TopKUnion(case["cer_topk"]), budget)
        assert scores.shape == expected.shape
        assert int(counts[0]) == case["kept_classes"] <= budget
        assert torch.equal(scores[0].flatten(1).abs().amax(1) > 0, kept_official)
        assert (scores - expected).abs().max() <= 1e-5, budget
        assert torch.all(scores[0][~kept_official] == 0)


def test_static_budget_too_small_says_so(golden):
    """A budget below the first kept set keeps only ``budget`` classes and reports the overflow."""
    case = next(c for c in golden["cases"] if c["cer_topk"] == 2)
    decoder = _decoder(golden, case["pooling"])
    img, text, guidance = _inputs(golden, case)
    budget = case["kept_classes"] - 1
    assert budget >= 1
    with torch.no_grad():
        scores, counts = decoder.rejecting_with_budget(img, text, guidance, TopKUnion(case["cer_topk"]), budget)
    assert int(counts[0]) > budget
    assert int((scores[0].flatten(1).abs().amax(1) > 0).sum()) <= budget
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize("k", [1, 2, 5])
def test_padded_keep_mask_equals_the_official_rule_on_the_real_rows(k):
    """TopKUnion.keep_mask_padded (static shapes) keeps exactly what keep_mask keeps on the real rows."""
    generator = torch.Generator().manual_seed(k)
    aux = torch.randn(9, 5, 7, generator=generator)
    valid = torch.rand(9, generator=generator) > 0.4
    valid[0] = True
    rule = TopKUnion(k)
    padded = rule.keep_mask_padded(aux, valid)
    expected = torch.zeros(9, dtype=torch.bool)
    expected[valid] = rule.keep_mask(aux[valid][None])
    assert torch.equal(padded, expected)
