"""Training losses (model.losses), freezing and parameter groups, reference vs fast, on a small
SED-B (64x64 encoder input, a few random classes). The official values: tests/test_training_golden.py."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import sed_fast
from sed_fast.models.fast import SEDFast
from sed_fast.models.sed import LOSS_KEYS, NORM_MODULE_TYPES, official_segmentation_loss

pytestmark = pytest.mark.filterwarnings("ignore::sed_fast.RandomWeightsWarning")

NUM_CLASSES = 5


def _small(dtype=torch.float32):
    torch.manual_seed(0)
    model = sed_fast.build_sed("b", impl="reference", device="cpu", clip_resolution=64)
    model.text_embeddings = F.normalize(torch.randn(NUM_CLASSES, 80, 640), dim=-1)
    model.class_names = [f"class{i}" for i in range(NUM_CLASSES)]
    return model.to(dtype)


@pytest.fixture(scope="module")
def reference64():
    return _small(torch.float64).train()


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(3)
    images = (torch.rand(2, 3, 45, 38, generator=generator) * 255).round().to(torch.uint8)
    labels = torch.randint(0, NUM_CLASSES, (2, 45, 38), generator=generator)
    labels[0, :7] = 255
    labels[1, :, :4] = 255
    return images, labels


def _losses_and_grads(model, images, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    losses = model.losses(images, labels, **kwargs)
    sum(losses.values()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return {k: v.detach() for k, v in losses.items()}, grads


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(scope="module")
def reference_result(reference64, batch):
    return _losses_and_grads(reference64, *batch)


def test_losses_keys_order_and_values(reference_result):
    losses, grads = reference_result
    assert tuple(losses) == LOSS_KEYS
    for value in losses.values():
        assert value.dim() == 0 and torch.isfinite(value) and 0 < float(value) < 10


def test_trainable_parameters_all_get_gradients_and_frozen_ones_none(reference64, reference_result):
    _, grads = reference_result
    trainable = reference64.trainable_parameters()
    assert set(grads) == set(trainable)
    assert all(name.startswith("sem_seg_head.predictor.transformer.") or ".clip_model.visual." in name
               for name in trainable)
    assert any(".clip_model.visual.trunk.stem" in name for name in trainable)
    for name, parameter in reference64.named_parameters():
        frozen = ".clip_model." in name and ".clip_model.visual." not in name
        assert parameter.requires_grad != frozen, name
    assert not reference64.clip_model.logit_scale.requires_grad


def test_fast_losses_and_gradients_equal_reference_float64(reference64, batch, reference_result):
    fast = SEDFast.from_reference(reference64).train()
    losses, grads = _losses_and_grads(fast, *batch)
    expected_losses, expected_grads = reference_result
    for key in LOSS_KEYS:
        assert abs(float(losses[key]) - float(expected_losses[key])) <= 1e-12 * abs(float(expected_losses[key]))
    assert set(grads) == set(expected_grads)
    worst = max(_rel(grads[name], expected_grads[name]) for name in expected_grads)
    assert worst <= 1e-9, worst


def test_fast_float32_agrees_with_reference(batch):
    reference = _small().train()
    fast = SEDFast.from_reference(reference).train()
    expected_losses, expected_grads = _losses_and_grads(reference, *batch)
    losses, grads = _losses_and_grads(fast, *batch)
    for key in LOSS_KEYS:
        assert abs(float(losses[key]) - float(expected_losses[key])) <= 1e-5 * float(expected_losses[key])
    # Whole-model L2: a few q/k gradients of the linear attention are ~1e-8 sums of cancelling
    # terms, float32 rounding alone moves them by ~1e-3 relative (float64 agrees to 1e-12 above).
    total = torch.cat([expected_grads[n].flatten() for n in expected_grads])
    diff = torch.cat([(grads[n] - expected_grads[n]).flatten() for n in expected_grads])
    assert float(diff.norm() / total.norm()) <= 1e-4


def test_aux_losses_train_their_heads_only(reference64, batch):
    """The official aux heads read detached inputs: loss_sem_seg_1 reaches head0 alone."""
    reference64.zero_grad(set_to_none=True)
    losses = reference64.losses(*batch)
    losses["loss_sem_seg_1"].backward()
    with_grad = {name for name, p in reference64.named_parameters() if p.grad is not None}
    reference64.zero_grad(set_to_none=True)
    assert with_grad == {"sem_seg_head.predictor.transformer.head0.weight",
                         "sem_seg_head.predictor.transformer.head0.bias"}


def test_guidance_features_are_detached(reference64, batch):
    """res2..res5 reach the decoder detached (the CLIP trunk trains through clip_vis_dense only)."""
    seen = []
    projection = reference64.decoder.decoder_guidance_projection[0]
    handle = projection.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        reference64.losses(*batch)
    finally:
        handle.remove()
    assert len(seen) == 1 and not seen[0].requires_grad


def test_official_loss_formula_by_hand():
    """BCE-with-logits against one-hot, zero at ignored pixels, mean over every element."""
    torch.manual_seed(5)
    logits = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 8, 10))
    labels[0, 0, :3] = 255
    up = F.interpolate(logits, size=(8, 10), mode="bilinear", align_corners=False)
    total = 0.0
    for b in range(2):
        for t in range(3):
            for y in range(8):
                for x in range(10):
                    target = 1.0 if labels[b, y, x] == t else 0.0
                    z = float(up[b, t, y, x])
                    total += max(z, 0) - z * target + math.log1p(math.exp(-abs(z)))
    expected = total / (2 * 3 * 8 * 10)
    assert abs(float(official_segmentation_loss(logits, labels, 255)) - expected) <= 1e-12


def test_activation_checkpointing_gives_the_same_gradients(reference64, batch, reference_result):
    expected_losses, expected_grads = reference_result
    for model in (reference64, SEDFast.from_reference(reference64).train()):
        model.decoder.activation_checkpointing = True
        try:
            losses, grads = _losses_and_grads(model, *batch)
        finally:
            model.decoder.activation_checkpointing = False
        for key in LOSS_KEYS:
            assert abs(float(losses[key]) - float(expected_losses[key])) <= 1e-12 * float(expected_losses[key])
        assert max(_rel(grads[n], expected_grads[n]) for n in expected_grads) <= 1e-9


def test_activation_checkpointing_recomputes(reference64, batch):
    """With checkpointing on, the decoder layers run again in the backward."""
    calls = []
    handle = reference64.decoder.decoder2.cnext.register_forward_hook(lambda *args: calls.append(1))
    reference64.decoder.activation_checkpointing = True
    try:
        losses = reference64.losses(*batch)
        assert len(calls) == 1
        sum(losses.values()).backward()
        assert len(calls) == 2
    finally:
        reference64.decoder.activation_checkpointing = False
        handle.remove()
        reference64.zero_grad(set_to_none=True)


def test_bf16_autocast_losses_close_to_float32(batch):
    """bf16 autocast training: losses within 2% and the whole-model gradient within 10% (L2) of
    float32 (documented tolerance: bf16 keeps 8 bits of mantissa)."""
    reference = _small().train()
    expected_losses, expected_grads = _losses_and_grads(reference, *batch)
    for model in (reference, SEDFast.from_reference(reference).train()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses, grads = _losses_and_grads(model, *batch)
        for key in LOSS_KEYS:
            assert losses[key].dtype == torch.float32
            assert abs(float(losses[key]) - float(expected_losses[key])) <= 0.02 * float(expected_losses[key])
        total = torch.cat([expected_grads[n].flatten() for n in expected_grads])
        diff = torch.cat([(grads[n].float() - expected_grads[n]).flatten() for n in expected_grads])
        assert float(diff.norm() / total.norm()) <= 0.1


def test_eval_gives_back_the_inference_model(batch):
    model = _small()
    images = batch[0].float()
    before = model(images)
    before_cer = copy.deepcopy(model)
    before_cer.cer_topk = 2
    scores_cer = before_cer(images)
    model.train()
    model.losses(*batch)["loss_sem_seg_0"].backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    assert not model.training and not model.decoder.training
    assert torch.equal(model(images), before)
    model.cer_topk = 2
    assert torch.equal(model(images), scores_cer)
    assert torch.equal(model.predict_labels(images), before_cer.predict_labels(images))


def test_freezing_survives_train_eval_and_loading(reference64):
    model = _small()
    text_param = model.clip_model.token_embedding.weight
    for step in (lambda m: m.train(), lambda m: m.eval(), lambda m: m.train(True)):
        step(model)
        assert not text_param.requires_grad and not model.clip_model.logit_scale.requires_grad
        assert model.clip_model.visual.trunk.stem[0].weight.requires_grad
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    assert not model.clip_model.token_embedding.weight.requires_grad
    assert not model.clip_model.logit_scale.requires_grad
    assert model.clip_model.visual.trunk.stem[0].weight.requires_grad
    assert all(p.requires_grad for p in model.decoder.parameters())
    model.clip_finetune = "none"
    assert not any(p.requires_grad for p in model.clip_model.parameters())
    model.train()
    assert not any(p.requires_grad for p in model.clip_model.parameters())
    with pytest.raises(ValueError, match="clip_finetune"):
        model.clip_finetune = "prompt"


def test_parameter_groups_follow_the_official_optimizer(reference64):
    groups = reference64.trainable_parameter_groups()
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"clip", "clip_norm", "decoder", "decoder_norm"}
    assert by_name["clip"]["lr"] == pytest.approx(2e-6) and by_name["decoder"]["lr"] == pytest.approx(2e-4)
    assert by_name["clip"]["weight_decay"] == by_name["decoder"]["weight_decay"] == pytest.approx(1e-4)
    assert by_name["clip_norm"]["weight_decay"] == by_name["decoder_norm"]["weight_decay"] == 0.0
    listed = [id(p) for g in groups for p in g["params"]]
    assert len(listed) == len(set(listed))
    assert set(listed) == {id(p) for p in reference64.trainable_parameters().values()}
    modules = dict(reference64.named_modules())
    for group in groups:
        assert len(group["params"]) == len(group["param_names"])
        for name in group["param_names"]:
            module_name = name.rsplit(".", 1)[0]
            # Official: the decoder's ConvNeXt blocks have their own LayerNorm class, not a norm type.
            plain = module_name.startswith("sem_seg_head.predictor.transformer.") and module_name.endswith("cnext.norm")
            expected = isinstance(modules[module_name], NORM_MODULE_TYPES) and not plain
            assert expected == group["name"].endswith("_norm"), name
    names = {n for g in groups for n in g["param_names"]}
    assert "sem_seg_head.predictor.transformer.decoder1.cnext.gamma" in by_name["decoder"]["param_names"]
    assert "sem_seg_head.predictor.transformer.decoder1.cnext.norm.weight" in by_name["decoder"]["param_names"]
    assert "sem_seg_head.predictor.transformer.decoder1.attention.norm1.weight" in by_name["decoder_norm"][
        "param_names"]
    assert any(".clip_model.visual.trunk.stages.0.blocks.0.norm." in n for n in by_name["clip_norm"]["param_names"])
    assert "sem_seg_head.predictor.transformer.decoder1.conv.double_conv.1.weight" in by_name["decoder_norm"][
        "param_names"]
    assert names == set(reference64.trainable_parameters())
    optimizer = torch.optim.AdamW(groups, lr=2e-4)
    assert len(optimizer.param_groups) == 4


@pytest.mark.parametrize("make, error, match", [
    (lambda i, lab: (i[0], lab), ValueError, "images must be"),
    (lambda i, lab: (i, lab[:, :-1]), ValueError, "labels must be"),
    (lambda i, lab: (i, lab.float()), TypeError, "integer class indices"),
    (lambda i, lab: (i.float() * 2, lab), ValueError, "0..255"),
    (lambda i, lab: (i.float().index_fill(0, torch.tensor([0]), float("nan")), lab), ValueError, "NaN"),
    (lambda i, lab: (i.to(torch.int32), lab), TypeError, "uint8 or float"),
    (lambda i, lab: (i, lab.index_fill(0, torch.tensor([1]), NUM_CLASSES)), ValueError, "outside the 5-class"),
    (lambda i, lab: (i, lab.index_fill(0, torch.tensor([1]), -1)), ValueError, "outside the 5-class"),
])
def test_bad_inputs_are_refused(reference64, batch, make, error, match):
    images, labels = make(*batch)
    with pytest.raises(error, match=match):
        reference64.losses(images, labels)


def test_ignore_value_must_not_be_a_class(reference64, batch):
    with pytest.raises(ValueError, match="is a class index"):
        reference64.losses(*batch, ignore_value=3)
    with pytest.raises(TypeError, match="ignore_value"):
        reference64.losses(*batch, ignore_value=2.5)


def test_other_ignore_value(reference64, batch):
    images, labels = batch
    moved = labels.clone()
    moved[moved == 255] = -1
    a = reference64.losses(images, labels)
    b = reference64.losses(images, moved, ignore_value=-1)
    for key in LOSS_KEYS:
        assert float(a[key].detach()) == float(b[key].detach())


def test_no_vocabulary_is_refused(batch):
    model = _small()
    model.text_embeddings = None
    with pytest.raises(RuntimeError, match="no vocabulary"):
        model.losses(*batch)


def test_losses_decode_every_class_whatever_cer_topk(reference64, batch, reference_result):
    """No rejection while training: cer_topk changes inference only."""
    expected_losses, _ = reference_result
    reference64.cer_topk = 1
    try:
        losses = reference64.losses(*batch)
    finally:
        reference64.cer_topk = None
    for key in LOSS_KEYS:
        assert float(losses[key].detach()) == pytest.approx(float(expected_losses[key]), rel=1e-12)
