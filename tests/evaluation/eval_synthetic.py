"""Tiny synthetic datasets in the official layouts, and a small-vocabulary copy of each registry entry."""
import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from sed_fast.evaluation.datasets import DATASETS

#: The classes the tests segment (the real text tower encodes them; the disk cache keeps them).
TINY = ("cat", "dog", "grass")
#: VOC-b in small: one object class and background; the names from index 1 on count as background
#: (the same three names as TINY, so their text embeddings come from the cache).
TINY_VOCB = dict(vocabulary=TINY, class_names=("cat", "background"), background_from=1)


def tiny_spec(name):
    """The official registry entry ``name`` with a 3-class vocabulary (same folders, extensions, ignore)."""
    spec = DATASETS[name]
    if spec.background_from is not None:
        return dataclasses.replace(spec, **TINY_VOCB)
    return dataclasses.replace(spec, vocabulary=TINY, class_names=None)


def tiny_registry():
    return {name: tiny_spec(name) for name in DATASETS}


def write_label(path: Path, label: np.ndarray, ext: str) -> None:
    if ext in (".tif", ".tiff"):
        Image.fromarray(label.astype(np.uint16)).save(path)  # 16-bit TIFF, as prepare_ade20k_full / pc459
    else:
        Image.fromarray(label.astype(np.uint8)).save(path)


def make_layout(root: Path, name: str, count: int = 3, seed: int = 0, sizes=((40, 56), (48, 36), (33, 64)),
                extra_image: bool = True, extra_label: bool = True):
    """Write ``count`` image/label pairs of dataset ``name`` under ``root`` in its official folders,
    plus (optionally) an image without a label and a label without an image. Label values: the 3
    tiny classes, and the dataset's ignore value on the first rows. Returns the stems of the pairs."""
    spec = tiny_spec(name)
    rng = np.random.default_rng(seed)
    image_dir, label_dir = root / spec.image_dir, root / spec.label_dir
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    num_classes = len(spec.class_names or spec.vocabulary)
    stems = []
    for i in range(count):
        h, w = sizes[i % len(sizes)]
        stem = f"{name}_{i:04d}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(image_dir / f"{stem}.jpg", quality=95)
        label = rng.integers(0, num_classes, (h, w))
        label[: 2 + i] = spec.ignore_label
        write_label(label_dir / f"{stem}{spec.label_ext}", label, spec.label_ext)
        stems.append(stem)
    if extra_image:
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(image_dir / "zz_no_label.jpg")
    if extra_label:
        write_label(label_dir / f"aa_no_image{spec.label_ext}", np.zeros((40, 40)), spec.label_ext)
    return stems


def patch_build(monkeypatch, cache):
    """Make ``sed_fast.api.build_sed`` build once per configuration, into ``cache``."""
    import sed_fast.api as api

    real = api.build_sed

    def build(variant="b", *, impl="reference", checkpoint=None, **kwargs):
        assert checkpoint is None, "the tests use random weights"
        key = (variant, impl) + tuple(sorted((k, str(v)) for k, v in kwargs.items()))
        if key not in cache:
            cache[key] = real(variant, impl=impl, checkpoint=None, **kwargs)
        return cache[key]

    monkeypatch.setattr(api, "build_sed", build)
