"""The fast model trains on the Triton kernels, forward and backward (interpreter on CPU, compiled
on CUDA): its losses and gradients against the reference model's autograd."""
import copy

import pytest
import torch
import torch.nn.functional as F

import sed_fast
from sed_fast.kernels import dispatch
from sed_fast.models.fast import SEDFast

pytestmark = pytest.mark.filterwarnings("ignore::sed_fast.RandomWeightsWarning")


def _losses_and_grads(model, images, labels):
    model.zero_grad(set_to_none=True)
    losses = model.losses(images, labels)
    sum(losses.values()).backward()
    grads = {name: p.grad.detach().cpu().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return {k: float(v.detach()) for k, v in losses.items()}, grads


@pytest.mark.xfail(strict=False, reason=(
    "open: on this project's current CI machine (Intel, cpu family 6 model 167) the fast model's gradients differ "
    "from the reference's by ~3e-3 relative (losses agree to 1e-7), at fa5f379 too and with any backend, the "
    "loss op swapped for the reference's or the oneDNN linears off; it passed on the AMD EPYC CI machines"))
def test_fast_training_step_on_kernels_matches_reference(triton_backend, monkeypatch):
    device = triton_backend
    ran = set()
    real_resolve_name = dispatch.resolve_name

    def recording_resolve_name(op, *args, **kwargs):
        name = real_resolve_name(op, *args, **kwargs)
        ran.add((op, name))
        return name

    monkeypatch.setattr(dispatch, "resolve_name", recording_resolve_name)
    torch.manual_seed(0)
    reference = sed_fast.build_sed("b", impl="reference", device="cpu", clip_resolution=64)
    reference.text_embeddings = F.normalize(torch.randn(4, 80, 640), dim=-1)
    reference.class_names = [f"c{i}" for i in range(4)]
    reference.train()
    generator = torch.Generator().manual_seed(3)
    images = (torch.rand(1, 3, 37, 30, generator=generator) * 255).round().to(torch.uint8)
    labels = torch.randint(0, 4, (1, 37, 30), generator=generator)
    labels[0, :5] = 255
    expected_losses, expected_grads = _losses_and_grads(reference, images, labels)

    model = reference if device.type == "cpu" else copy.deepcopy(reference).to(device)
    fast = SEDFast.from_reference(model).train()
    losses, grads = _losses_and_grads(fast, images.to(device), labels.to(device))
    for key, value in expected_losses.items():
        assert abs(losses[key] - value) <= 1e-5 * abs(value), (key, losses[key], value)
    assert set(grads) == set(expected_grads)
    total = torch.cat([expected_grads[n].flatten() for n in expected_grads])
    diff = torch.cat([(grads[n] - expected_grads[n]).flatten() for n in expected_grads])
    assert torch.isfinite(diff).all()
    assert float(diff.norm() / total.norm()) <= 1e-4
    for op in ("cost_map", "dwconv_layernorm", "class_attention"):  # the kernels did run, both ways
        assert (op, "triton") in ran and (f"{op}_backward", "triton") in ran, sorted(ran)
