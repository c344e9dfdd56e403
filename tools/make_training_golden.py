"""Compute tests/official_training_golden.pt: the official SED training losses and gradients.

Runs the official code (github:xb534/SED: ``SED.forward`` in training mode, ``SEDHead``,
``SEDPredictor.forward``, ``Aggregator``; detectron2's real ``ImageList``) on a small SED-B
(encoder input 96x96 instead of 768, a few random classes), in float64, with weights drawn by
``tests/training_golden.py`` (the same recipe the test uses for our model), and saves the losses
and, for every trainable parameter, its gradient (whole for small tensors, else its norm, two
random projections and a fixed sample of entries: the fixture stays ~100 KB).

What is not the official code here, and why:
* detectron2's config/registry machinery is stubbed (``configurable`` is a pass-through; the
  registries accept registrations): it only wires modules together;
* ``SEDPredictor.__init__`` is bypassed (it downloads pretrained CLIP weights and encodes the
  training vocabulary on CUDA); its attributes are set as it would set them: the CLIP model (the
  installed open_clip's ConvNeXt-B with the official fork's ``TimmModel.forward(dense=True)``
  bound to its image tower), the official ``Aggregator`` built with the arguments
  ``configs/convnextB_768.yaml`` gives, the class embeddings (T, P, D) float;
* ``SED.clip_resolution`` is set to 96 (hard-coded 768 in ``SED.__init__``);
* float64 throughout: ``one_hot(...).float()`` in ``sed_model.py`` yields the default dtype (see
  :class:`_Float64OneHot`).

Usage (needs einops and git):
    python tools/make_training_golden.py --sed-git /work/.mirror/xb534+SED/repo \
        --detectron2-git /work/.mirror/facebookresearch+detectron2/repo --out tests/official_training_golden.pt
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import training_golden as recipe  # noqa: E402  (tests/training_golden.py)

SED_FILES = ["sed/sed_model.py", "sed/modeling/heads/sed_head.py", "sed/modeling/transformer/sed_predictor.py",
             "sed/modeling/transformer/model.py", "sed/modeling/transformer/convnext.py",
             "open_clip/src/open_clip/timm_model.py"]
D2_FILES = ["detectron2/structures/image_list.py", "detectron2/layers/wrappers.py", "detectron2/utils/env.py",
            "detectron2/utils/torch_version_utils.py"]


def _extract(git_dir: str, files, dest: Path) -> None:
    for name in files:
        text = subprocess.run(["git", "--git-dir", git_dir, "show", f"HEAD:{name}"], check=True,
                              capture_output=True, text=True).stdout
        path = dest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _package(name: str, path=None) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = [str(path)] if path is not None else []
    sys.modules[name] = module
    return module


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class _Registry:
    def register(self, obj=None):
        return obj if obj is not None else (lambda o: o)


def _stub_detectron2(root: Path) -> None:
    """Real ImageList (and what it imports); pass-through config and registries."""
    d2 = root / "detectron2"
    _package("detectron2", d2)
    _package("detectron2.utils", d2 / "utils")
    _load("detectron2.utils.env", d2 / "utils/env.py")
    _load("detectron2.utils.torch_version_utils", d2 / "utils/torch_version_utils.py")
    memory = _package("detectron2.utils.memory")
    memory._ignore_torch_cuda_oom = contextlib.nullcontext
    layers = _package("detectron2.layers", d2 / "layers")
    _load("detectron2.layers.wrappers", d2 / "layers/wrappers.py")
    layers.Conv2d, layers.ShapeSpec, layers.get_norm = nn.Conv2d, object, None
    _package("detectron2.structures", d2 / "structures")
    image_list = _load("detectron2.structures.image_list", d2 / "structures/image_list.py")
    sys.modules["detectron2.structures"].ImageList = image_list.ImageList
    config = _package("detectron2.config")
    config.configurable = lambda init: init
    data = _package("detectron2.data")
    data.MetadataCatalog = None
    modeling = _package("detectron2.modeling")
    modeling.META_ARCH_REGISTRY = modeling.SEM_SEG_HEADS_REGISTRY = _Registry()
    modeling.build_backbone = modeling.build_sem_seg_head = None
    backbone = _package("detectron2.modeling.backbone")
    backbone.Backbone = nn.Module
    postprocessing = _package("detectron2.modeling.postprocessing")
    postprocessing.sem_seg_postprocess = None
    fvcore = _package("fvcore")
    fvcore_nn = _package("fvcore.nn")
    fvcore_nn.weight_init = _package("fvcore.nn.weight_init")
    fvcore.nn = fvcore_nn


class _Float64OneHot:
    """torch.nn.functional for sed_model.py, except that ``one_hot(...).float()`` gives float64: the
    official code puts its float32 one-hot into targets of the default dtype, which float64 refuses
    (one-hot values are exact in either dtype)."""

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)

    @staticmethod
    def one_hot(*args, **kwargs):
        onehot = torch.nn.functional.one_hot(*args, **kwargs)
        return types.SimpleNamespace(float=lambda: onehot.to(torch.get_default_dtype()))


def _load_official(root: Path):
    _package("sed", root / "sed")
    third_party = _package("sed.third_party")
    third_party.clip = _package("sed.third_party.clip")
    third_party.imagenet_templates = _package("sed.third_party.imagenet_templates")
    _package("sed.modeling", root / "sed/modeling")
    _package("sed.modeling.transformer", root / "sed/modeling/transformer")
    _package("sed.modeling.heads", root / "sed/modeling/heads")
    transformer = _load("sed.modeling.transformer.model", root / "sed/modeling/transformer/model.py")
    predictor = _load("sed.modeling.transformer.sed_predictor", root / "sed/modeling/transformer/sed_predictor.py")
    head = _load("sed.modeling.heads.sed_head", root / "sed/modeling/heads/sed_head.py")
    model = _load("sed.sed_model", root / "sed/sed_model.py")
    model.F = _Float64OneHot()
    fork = _package("official_open_clip", root / "open_clip/src/open_clip")
    utils = _package("official_open_clip.utils")
    utils.freeze_batch_norm_2d = None
    fork.utils = utils
    timm_model = _load("official_open_clip.timm_model", root / "open_clip/src/open_clip/timm_model.py")
    return transformer.Aggregator, predictor.SEDPredictor, head.SEDHead, model.SED, timm_model.TimmModel


def _official_model(ours, text, classes):
    Aggregator, SEDPredictor, SEDHead, SED, TimmModel = _load_official(_official_model.root)
    clip = copy.deepcopy(ours.clip_model)
    visual = clip.visual
    visual.forward = types.MethodType(TimmModel.forward, visual)
    visual.visual_prediction_forward_convnext = types.MethodType(TimmModel.visual_prediction_forward_convnext, visual)
    clip.encode_image = lambda image, normalize=False, dense=False: clip.visual(image, dense=dense)  # the fork's
    # configs/convnextB_768.yaml as SEDPredictor.__init__ passes it to the Aggregator.
    aggregator = Aggregator(
        text_guidance_dim=0, text_guidance_proj_dim=0, appearance_guidance_dim=1024,
        appearance_guidance_proj_dim=128, decoder_dims=[64, 32, 16], decoder_guidance_dims=[512, 256, 128],
        decoder_guidance_proj_dims=[32, 16, 8], num_layers=2, nheads=4, hidden_dim=128, pooling_size=[2, 2],
        feature_resolution=[24, 24], window_size=12, attention_type="linear", prompt_channel=80, cnext_type="V1",
        kernel_size=[9, 9, 9], fast_inference=False, topK=1)
    missing = aggregator.load_state_dict(ours.decoder.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    predictor = SEDPredictor.__new__(SEDPredictor)
    nn.Module.__init__(predictor)
    predictor.text_features = text.clone()
    predictor.text_features_test = text.clone()
    predictor.clip_model = clip
    predictor.transformer = aggregator
    head = SEDHead(input_shape={}, num_classes=classes, ignore_value=255, feature_resolution=[24, 24],
                   transformer_predictor=predictor)
    official = SED(backbone=nn.Module(), sem_seg_head=head, size_divisibility=32,
                   pixel_mean=[123.675, 116.280, 103.530], pixel_std=[58.395, 57.120, 57.375],
                   clip_pixel_mean=[122.7709383, 116.7460125, 104.09373615],
                   clip_pixel_std=[68.5005327, 66.6321579, 70.3231630], train_class_json="", test_class_json="",
                   sliding_window=False, clip_finetune="full", backbone_multiplier=0.0, clip_pretrained="Convnext-B",
                   in_features=["res2", "res3", "res4", "res5"], fast_inference=False)
    official.clip_resolution = (recipe.CLIP_RESOLUTION, recipe.CLIP_RESOLUTION)
    return official


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sed-git", required=True, help="git dir of github:xb534/SED")
    parser.add_argument("--detectron2-git", required=True, help="git dir of github:facebookresearch/detectron2")
    parser.add_argument("--out", default=str(ROOT / "tests" / "official_training_golden.pt"))
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _extract(args.sed_git, SED_FILES, root)
        _extract(args.detectron2_git, D2_FILES, root)
        _stub_detectron2(root)
        _official_model.root = root
        torch.set_default_dtype(torch.float64)  # the official code makes its targets with the default dtype
        try:
            ours = recipe.build_model()
            images, labels = recipe.batch()
            text = ours.text_embeddings.clone()
            official = _official_model(ours, text, recipe.NUM_CLASSES).double().train()
            for name, parameter in official.named_parameters():  # the official freezing, seen from our names
                ours_name = name
                assert parameter.requires_grad == dict(ours.named_parameters())[ours_name].requires_grad, name
            inputs = [{"image": images[b], "sem_seg": labels[b]} for b in range(images.shape[0])]
            with contextlib.redirect_stdout(io.StringIO()):  # it prints every parameter without a grad yet
                losses = official(inputs)
            sum(losses.values()).backward()
            grads = {name: p.grad.detach().clone() for name, p in official.named_parameters() if p.grad is not None}
        finally:
            torch.set_default_dtype(torch.float32)
    trainable = [name for name, p in official.named_parameters() if p.requires_grad]
    assert set(grads) == set(trainable), set(trainable) ^ set(grads)
    data = {
        "description": "official SED training losses and gradients (tools/make_training_golden.py)",
        "recipe_version": recipe.VERSION,
        "loss_keys": list(losses),
        "losses": {k: float(v.detach()) for k, v in losses.items()},
        "grads": {name: recipe.summarise(name, g) for name, g in grads.items()},
    }
    torch.save(data, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e3:.0f} KB): losses {data['losses']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
