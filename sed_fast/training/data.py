"""Training data: the official COCO-Stuff-171 training set or a custom folder, read, augmented and
batched in a data order that depends only on the seed.

Pairing and reading are those of ``sed-fast eval`` (:mod:`sed_fast.evaluation.datasets`): images and
label maps paired by file stem, images as detectron2's ``read_image(path, "RGB")``, labels as
``np.array(Image.open(f))``, the same errors for label values that are neither a class nor the
ignore value.

Data order, as detectron2's ``TrainingSampler`` (``shuffle=True``): an endless stream of
permutations of the dataset drawn one after the other from one ``torch.Generator`` seeded with the
run seed; process r of W takes stream positions r, r + W, r + 2W, ... and batches them in order, so
iteration i of a run with B images per iteration uses positions i*B .. i*B + B - 1 whatever W. A
sample's augmentation is seeded by its stream position (:func:`augment.sample_rngs`), so resuming at
iteration i needs nothing but i.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from ..evaluation.datasets import (DatasetError, DatasetSpec, ResolvedDataset, Sample, custom_dataset,
                                   map_label, read_image, read_label, resolve_dataset)
from .augment import AugmentConfig, augment, pad_to_divisibility, sample_rngs

__all__ = ["TRAIN_DATASETS", "load_train_dataset", "DataOrder", "TrainDataset", "IterationSampler", "collate",
           "check_samples"]

#: The official training set (``sed/data/datasets/register_coco_stuff.py``: ``coco_2017_train_stuff_all_sem_seg``).
TRAIN_DATASETS: Dict[str, DatasetSpec] = {
    "coco": DatasetSpec("coco", "coco-stuff/images/train2017", "coco-stuff/annotations_detectron2/train2017",
                        ".jpg", ".png", 255, "coco", registered_as="coco_2017_train_stuff_all_sem_seg"),
}


def load_train_dataset(name: Optional[str] = None, root=None, images=None, labels=None, vocabulary=None,
                       ignore_label: Optional[int] = None) -> ResolvedDataset:
    """A named training set (``coco``) under ``root``, or a custom one (all of images, labels,
    vocabulary, ignore_label)."""
    if name is not None:
        return resolve_dataset(name, root, registry=TRAIN_DATASETS)
    return custom_dataset(images, labels, vocabulary, ignore_label)


class DataOrder:
    """Stream position -> dataset index: detectron2's ``TrainingSampler`` permutations."""

    def __init__(self, size: int, seed: int):
        if size < 1:
            raise DatasetError("the training set is empty")
        self.size = size
        self.seed = int(seed)
        self._generator = torch.Generator()
        self._generator.manual_seed(self.seed)
        self._epochs: List[List[int]] = []

    def _epoch(self, epoch: int) -> List[int]:
        while len(self._epochs) <= epoch:
            self._epochs.append(torch.randperm(self.size, generator=self._generator).tolist())
            if len(self._epochs) > 2:  # positions only move forward: old epochs are not needed again
                self._epochs[len(self._epochs) - 3] = None  # type: ignore[call-overload]
        order = self._epochs[epoch]
        if order is None:  # asked for an epoch already dropped: replay from the start
            fresh = DataOrder(self.size, self.seed)
            return fresh._epoch(epoch)
        return order

    def __call__(self, position: int) -> int:
        epoch, offset = divmod(int(position), self.size)
        return self._epoch(epoch)[offset]


def rank_positions(iteration: int, batch_per_rank: int, rank: int, world_size: int) -> List[int]:
    """The stream positions process ``rank`` trains on at ``iteration``."""
    first = iteration * batch_per_rank
    return [(first + j) * world_size + rank for j in range(batch_per_rank)]


class IterationSampler(torch.utils.data.Sampler):
    """Batches of stream positions for one process, iterations ``start`` .. ``stop - 1``."""

    def __init__(self, start: int, stop: int, batch_per_rank: int, rank: int, world_size: int):
        self.start, self.stop = start, stop
        self.batch_per_rank, self.rank, self.world_size = batch_per_rank, rank, world_size

    def __iter__(self) -> Iterator[List[int]]:
        for iteration in range(self.start, self.stop):
            yield rank_positions(iteration, self.batch_per_rank, self.rank, self.world_size)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


@dataclass
class _Reader:
    """Reads and checks one pair as ``sed-fast eval`` does; labels keep the ignore value."""

    num_classes: int
    ignore_label: int
    palette: object = None  # sed_fast.evaluation.palette.Palette for colour label maps

    def label(self, sample: Sample) -> np.ndarray:
        try:
            return read_label(sample.label, self.palette, self.ignore_label, "error")
        except DatasetError:
            raise
        except Exception as error:  # noqa: BLE001
            raise DatasetError(f"cannot read the label map {sample.label}: {type(error).__name__}: {error}") from error

    def read(self, sample: Sample):
        try:
            image = read_image(sample.image)
        except Exception as error:  # noqa: BLE001
            raise DatasetError(f"cannot read the image {sample.image}: {type(error).__name__}: {error}") from error
        label = self.label(sample)
        self.check(sample, image.shape[:2], label)
        return image, label

    def check(self, sample: Sample, image_size, label: np.ndarray) -> None:
        if label.ndim != 2:
            raise DatasetError(f"{sample.label}: a label map must be 2-D, got shape {label.shape}")
        if tuple(label.shape) != tuple(image_size):
            raise DatasetError(f"{sample.stem}: the image is {image_size[1]}x{image_size[0]} but its label map "
                               f"{sample.label.name} is {label.shape[1]}x{label.shape[0]} (width x height)")
        try:
            map_label(label, self.num_classes, self.ignore_label, "error", where=str(sample.label))
        except DatasetError as error:  # the same check as sed-fast eval, without its --invalid-labels hint
            raise DatasetError(str(error).split(" (pass --invalid-labels")[0]
                               + f" (the vocabulary has {self.num_classes} names)") from None


class TrainDataset(torch.utils.data.Dataset):
    """Map-style dataset over stream positions: item = one augmented, padded sample.

    Item: ``{"position", "stem", "image": (3, H, W) uint8, "label": (H, W) int64 with the ignore
    value, "error": None or a message}``; decoding and augmentation run in the loader workers.
    """

    def __init__(self, samples: Sequence[Sample], num_classes: int, ignore_label: int, config: AugmentConfig,
                 seed: int, palette=None):
        self.samples = list(samples)
        self.reader = _Reader(num_classes, ignore_label, palette)
        self.ignore_label = ignore_label
        self.config = config
        self.seed = int(seed)
        self.order = DataOrder(len(self.samples), seed)

    def __len__(self) -> int:  # positions are unbounded; the sampler says which
        return len(self.samples)

    def __getitem__(self, position: int) -> dict:
        sample = self.samples[self.order(position)]
        item = {"position": int(position), "stem": sample.stem, "image": None, "label": None, "error": None}
        try:
            image, label = self.reader.read(sample)
            np_rng, py_rng = sample_rngs(self.seed, position)
            image, label = augment(image, label, self.config, self.ignore_label, np_rng, py_rng)
            image_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
            label_t = torch.from_numpy(label.astype(np.int64))
            item["image"], item["label"] = pad_to_divisibility(image_t, label_t, self.config.size_divisibility,
                                                               self.ignore_label)
        except DatasetError as error:
            item["error"] = str(error)
        except Exception as error:  # noqa: BLE001 - name the file, whatever the reason
            item["error"] = f"{sample.stem}: {type(error).__name__}: {error}"
        return item


def collate(items: List[dict], ignore_label: int) -> dict:
    """Stack a batch; crops of different sizes (only without padding to a divisibility) are padded
    to the largest as the model's ``ImageList`` would."""
    batch = {key: [item[key] for item in items] for key in ("position", "stem", "error")}
    if any(error is not None for error in batch["error"]):
        return batch
    height = max(item["label"].shape[0] for item in items)
    width = max(item["label"].shape[1] for item in items)
    pairs = [pad_to_divisibility(item["image"], item["label"], 0, ignore_label, size=(height, width))
             for item in items]
    batch["image"] = torch.stack([p[0] for p in pairs])
    batch["label"] = torch.stack([p[1] for p in pairs])
    return batch


class _Collate:
    def __init__(self, ignore_label: int):
        self.ignore_label = ignore_label

    def __call__(self, items):
        return collate(items, self.ignore_label)


# -- the check before the first iteration ------------------------------------------------------------
class _CheckDataset(torch.utils.data.Dataset):
    """Reads each label map and the image's size (its header and EXIF orientation, not its pixels)."""

    def __init__(self, samples: Sequence[Sample], indices: Sequence[int], num_classes: int, ignore_label: int,
                 palette=None):
        self.samples, self.indices = list(samples), list(indices)
        self.reader = _Reader(num_classes, ignore_label, palette)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        sample = self.samples[self.indices[position]]
        try:
            size = image_size(sample.image)
            label = self.reader.label(sample)
            self.reader.check(sample, size, label)
            labelled = bool((label != self.reader.ignore_label).any())
            return sample.stem, None, labelled
        except DatasetError as error:
            return sample.stem, str(error), False
        except Exception as error:  # noqa: BLE001
            return sample.stem, f"{sample.stem}: {type(error).__name__}: {error}", False


def image_size(path) -> tuple:
    """(H, W) of the image as ``read_image`` returns it (EXIF orientation applied), from its header
    (opened by the same checked reader: a regular file, within the pixel limit)."""
    from ..inputs.image_files import open_image

    with open_image(path) as image:
        width, height = image.size
        try:
            orientation = image.getexif().get(0x0112)
        except Exception:  # noqa: BLE001 - unreadable EXIF counts as none, as in read_image
            orientation = None
        if orientation in (5, 6, 7, 8):
            width, height = height, width
    return height, width


def check_samples(samples: Sequence[Sample], indices: Sequence[int], num_classes: int, ignore_label: int,
                  workers: int, limit_errors: int = 5, palette=None):
    """(errors (up to ``limit_errors`` messages), number of pairs with no labelled pixel) of ``indices``."""
    loader = torch.utils.data.DataLoader(_CheckDataset(samples, indices, num_classes, ignore_label, palette),
                                         batch_size=None,
                                         num_workers=workers, shuffle=False)
    errors: List[str] = []
    unlabelled = 0
    for _stem, error, labelled in loader:
        if error is not None:
            errors.append(error)
            if len(errors) >= limit_errors:
                break
        elif not labelled:
            unlabelled += 1
    return errors, unlabelled
