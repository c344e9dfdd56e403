"""The fast model with every op on its Triton kernel (interpreter on CPU, compiled on CUDA) against
the reference model: the kernels fit together (layouts, strides, ragged class offsets)."""
import pytest
import torch
import torch.nn.functional as F

import sed_fast
from sed_fast.models.fast import SEDFast

pytestmark = pytest.mark.filterwarnings("ignore::sed_fast.RandomWeightsWarning")


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = sed_fast.build_sed("b", impl="reference", device="cpu", clip_resolution=64)
    model.text_embeddings = F.normalize(torch.randn(5, 80, 640), dim=-1)
    model.class_names = [f"c{i}" for i in range(5)]
    return model


@pytest.mark.parametrize("cer_topk", [None, 1])
def test_fast_model_on_kernels_matches_reference(reference, triton_backend, cer_topk):
    device = triton_backend
    torch.manual_seed(1)
    images = torch.rand(2, 3, 37, 41) * 255
    reference.cer_topk = cer_topk
    try:
        expected = reference(images)
        model = reference if device.type == "cpu" else __import__("copy").deepcopy(reference).to(device)
        fast = SEDFast.from_reference(model)
        got = fast(images.to(device)).cpu()
    finally:
        reference.cer_topk = None
    kept = got.flatten(2).amax(2) > 0
    assert torch.equal(kept, expected.flatten(2).amax(2) > 0)
    assert (got - expected).abs().max() <= 1e-4
