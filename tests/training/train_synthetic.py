"""Helpers of the training tests: a small memorisable data set, SED built once per process, and
:class:`TinySED`, a tiny trainable model with SED's module names and interface for the tests of
the tool's machinery (DDP, resume, signals, checks), whose steps take milliseconds."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLASSES = ("sky", "grass", "road")
RESOLUTION = 64


def write_dataset(root: Path, count: int = 4, size=(48, 64), seed: int = 0):
    """Images whose colour says the class: a memorisable set (label = class of each block)."""
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    colours = np.array([[70, 130, 230], [40, 180, 60], [110, 110, 110]], dtype=np.uint8)
    rng = np.random.default_rng(seed)
    for i in range(count):
        label = np.zeros(size, dtype=np.uint8)
        label[:, size[1] // 2:] = 1 + i % 2
        label[: size[0] // 3] = 0
        label[0, :] = 255
        image = colours[np.minimum(label, 2)] + rng.integers(0, 8, size + (3,), dtype=np.uint8)
        Image.fromarray(image).save(images / f"img{i:02d}.png")
        Image.fromarray(label, mode="L").save(labels / f"img{i:02d}.png")
    return images, labels


_MODELS = {}


def cached_build(monkeypatch):
    """Build each (impl, resolution, seed, weights) model once per test process, hand out copies."""
    from sed_fast.training import cli

    real = cli._build_model

    def build(args, spec, device, state_dict, vocabulary):
        from sed_fast.data.checkpoint import load_checkpoint

        key = (args.impl, args.resolution, args.seed, tuple(vocabulary))
        if key not in _MODELS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _MODELS[key] = real(args, spec, device, None, vocabulary)
        model = copy.deepcopy(_MODELS[key])
        if state_dict is not None:
            load_checkpoint(model, state_dict)
            model.random_weights = False
        return model

    monkeypatch.setattr(cli, "_build_model", build)


# -- a tiny trainable stand-in for SED (the tool's machinery: resume, signals, DDP, checks) ----------
class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        from timm.layers import DropPath
        self.drop_path = DropPath(0.1)  # stochastic depth: draws from the global torch RNG

    def forward(self, x):
        return x + self.drop_path(torch.relu(self.conv(x)))


class _Visual(torch.nn.Module):
    """A ConvNeXt-like trunk: ``trunk.stages[i].blocks[j].drop_path`` as timm's."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Identity()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, 8)
        self.trunk = torch.nn.Module()
        stage = torch.nn.Module()
        stage.blocks = torch.nn.Sequential(_Block(), _Block())
        self.trunk.stages = torch.nn.ModuleList([stage])

    def forward(self, x):
        x = torch.relu(self.norm(self.stem(x)))
        return self.trunk.stages[0].blocks(x)


class _Clip(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = _Visual()
        self.transformer = torch.nn.Linear(4, 4)  # the text tower: frozen in training
        self.logit_scale = torch.nn.Parameter(torch.ones([]))


class _Up(torch.nn.Module):
    def __init__(self, classes):
        super().__init__()
        from sed_fast.models.decoder import ConvNextBlock
        self.cnext = ConvNextBlock(8, kernel_size=3)  # SED's class: its norm keeps the weight decay
        self.head = torch.nn.Conv2d(8, classes, 1)


class TinySED(torch.nn.Module):
    """Module names as SED's (``sem_seg_head.predictor.clip_model.visual``, ``...transformer``)."""

    def __init__(self, classes: int, clip_resolution: int = 32):
        super().__init__()
        self.sem_seg_head = torch.nn.Module()
        self.sem_seg_head.predictor = torch.nn.Module()
        self.sem_seg_head.predictor.clip_model = _Clip()
        self.sem_seg_head.predictor.transformer = _Up(classes)
        self.clip_resolution = clip_resolution
        self.class_names = []
        from sed_fast.models.config import variant_spec
        self.spec = variant_spec("b")

    @property
    def clip_model(self):
        return self.sem_seg_head.predictor.clip_model

    @property
    def decoder(self):
        return self.sem_seg_head.predictor.transformer

    def set_vocabulary(self, names):
        self.class_names = list(names)
        return self.class_names

    def trainable_parameter_groups(self, **solver):
        """SED's own grouping (the real function, not a copy)."""
        from sed_fast.models.sed import trainable_parameter_groups
        return trainable_parameter_groups(self, self.decoder, **solver)

    def train(self, mode=True):
        super().train(mode)
        for name, p in self.named_parameters():
            p.requires_grad_("visual" in name or "predictor.transformer" in name)
        return self

    def _logits(self, images):
        x = F.interpolate(images.float() / 255.0 - 0.5, size=(self.clip_resolution,) * 2, mode="bilinear",
                          align_corners=False)
        features = self.clip_model.visual(x)
        features = self.decoder.cnext(features)
        return self.decoder.head(features)

    @torch.no_grad()
    def predict_labels(self, images):
        return [F.interpolate(self._logits(image[None]), size=image.shape[-2:], mode="bilinear",
                              align_corners=False)[0].argmax(0) for image in images]

    def losses(self, images, labels, *, ignore_value=255):
        logits = self._logits(images)
        out = {}
        for i in range(4):
            head = logits if i == 0 else logits.detach() * 0 + logits * (0.5 ** i)
            up = F.interpolate(head, size=labels.shape[-2:], mode="bilinear", align_corners=False)
            valid = labels != ignore_value
            target = F.one_hot(torch.where(valid, labels, 0), up.shape[1]).permute(0, 3, 1, 2).float()
            out[f"loss_sem_seg_{i}"] = F.binary_cross_entropy_with_logits(up, target * valid[:, None])
        return out


def tiny_builder():
    """A ``_build_model`` of ``sed-fast train`` that builds :class:`TinySED` (seeded by --seed)."""
    def build(args, spec, device, state_dict, vocabulary):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            model = TinySED(len(vocabulary))
        if state_dict is not None:
            model.load_state_dict(state_dict, strict=True)
        model.set_vocabulary(vocabulary)
        return model

    return build


def tiny_build(monkeypatch=None):
    """``sed-fast train`` builds :class:`TinySED` (seeded by --seed) instead of SED."""
    from sed_fast.training import cli

    build = tiny_builder()
    if monkeypatch is not None:
        monkeypatch.setattr(cli, "_build_model", build)
    else:
        cli._build_model = build
