"""The official evaluation datasets, in the layouts the official ``datasets/prepare_*.py`` write.

Each dataset is a folder of images and a folder of label maps under one root (``--data-root``, else
``$DETECTRON2_DATASETS``, else ``datasets``), exactly as SED registers them
(``sed/data/datasets/register_*.py``). Images and labels are paired by file stem, as detectron2's
``load_sem_seg`` does when the two folders differ in size (the intersection, sorted by stem); the
files without a partner are counted and reported. Unlike ``load_sem_seg``, the pairing is by stem
also when both folders hold the same number of files (``load_sem_seg`` then zips the two sorted
lists, which pairs the wrong files if their stems differ).

Reading follows detectron2: images as ``read_image(path, "RGB")`` (EXIF orientation applied, then
``convert("RGB")``, uint8), labels as ``np.array(Image.open(f), dtype=int)`` (8-bit PNGs, 16-bit
TIFFs for ADE-847 and PC-459).

Label values: ``ignore_label`` marks unlabelled pixels (mapped to class N, outside the metrics, as
detectron2 does); any other value outside ``0..N-1`` is an invalid label. detectron2 silently
drops the value N and corrupts its confusion matrix with larger ones; here each is an error naming
the file, or, with ``invalid_labels="ignore"``, ignored and counted.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..inputs.image_files import InputFileError, apply_exif_orientation, check_regular_file, open_image, read_rgb

__all__ = ["DatasetSpec", "DATASETS", "EvalDataset", "DatasetError", "Sample", "default_data_root",
           "resolve_dataset", "custom_dataset", "pair_by_stem", "read_image", "read_label", "collate"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
LABEL_EXTENSIONS = (".png", ".tif", ".tiff")


class DatasetError(Exception):
    """A dataset that cannot be evaluated as asked: missing folder, no pairs, bad label values."""


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives and how its labels are scored.

    ``vocabulary`` is what the model segments (a built-in vocabulary name or a list of names);
    ``class_names`` are the N evaluated classes (the vocabulary itself unless given).
    ``background_from``: predictions of vocabulary index >= this count as class
    ``background_from`` (VOC-b: the 39 extra Pascal-Context names all mean "background", class 20,
    as the official ``VOCbEvaluator`` does with ``pred[pred >= 20] = 20``).
    """

    name: str
    image_dir: str  # relative to the data root (named datasets) or absolute (custom)
    label_dir: str
    image_ext: Union[str, Tuple[str, ...]]
    label_ext: Union[str, Tuple[str, ...]]
    ignore_label: int
    vocabulary: Union[str, Tuple[str, ...]]
    class_names: Optional[Tuple[str, ...]] = None
    background_from: Optional[int] = None
    registered_as: str = ""  # the official detectron2 dataset name, for the report


_VOC20 = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
          "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")

#: The official evaluation sets, as registered by SED (``sed/data/datasets/register_*.py``).
DATASETS: Dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("ade150", "ADEChallengeData2016/images/validation",
                "ADEChallengeData2016/annotations_detectron2/validation", ".jpg", ".png", 255, "ade150",
                registered_as="ade20k_150_test_sem_seg"),
    DatasetSpec("ade847", "ADE20K_2021_17_01/images_detectron2/validation",
                "ADE20K_2021_17_01/annotations_detectron2/validation", ".jpg", ".tif", 65535, "ade847",
                registered_as="ade20k_full_sem_seg_freq_val_all"),
    DatasetSpec("pc59", "VOCdevkit/VOC2010/JPEGImages", "VOCdevkit/VOC2010/annotations_detectron2/pc59_val",
                ".jpg", ".png", 255, "pc59", registered_as="context_59_test_sem_seg"),
    DatasetSpec("pc459", "VOCdevkit/VOC2010/JPEGImages", "VOCdevkit/VOC2010/annotations_detectron2/pc459_val",
                ".jpg", ".tif", 459, "pc459", registered_as="context_459_test_sem_seg"),
    DatasetSpec("voc20", "VOCdevkit/VOC2012/JPEGImages", "VOCdevkit/VOC2012/annotations_detectron2/val",
                ".jpg", ".png", 255, "voc20", registered_as="voc_2012_test_sem_seg"),
    DatasetSpec("voc20b", "VOCdevkit/VOC2012/JPEGImages", "VOCdevkit/VOC2012/annotations_detectron2_bg/val",
                ".jpg", ".png", 255, "voc20b", class_names=_VOC20 + ("background",), background_from=20,
                registered_as="voc_2012_test_background_sem_seg"),
    DatasetSpec("coco", "coco-stuff/images/val2017", "coco-stuff/annotations_detectron2/val2017",
                ".jpg", ".png", 255, "coco", registered_as="coco_2017_test_stuff_all_sem_seg"),
)}


def default_data_root() -> Path:
    """``$DETECTRON2_DATASETS`` if set, else ``datasets`` (relative to the working directory), as SED."""
    return Path(os.environ.get("DETECTRON2_DATASETS", "datasets"))


@dataclass
class Sample:
    """One image and its label map (paths only; read by :class:`EvalDataset`)."""

    stem: str
    image: Path
    label: Path


@dataclass
class ResolvedDataset:
    """A dataset with its files paired: what is evaluated and what was left out."""

    spec: DatasetSpec
    image_dir: Path
    label_dir: Path
    samples: List[Sample]
    vocabulary: List[str]
    class_names: List[str]
    images_without_label: List[str] = field(default_factory=list)  # stems
    labels_without_image: List[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> dict:
        return {
            "name": self.spec.name,
            "registered_as": self.spec.registered_as or None,
            "image_dir": str(self.image_dir),
            "label_dir": str(self.label_dir),
            "ignore_label": self.spec.ignore_label,
            "num_classes": self.num_classes,
            "vocabulary_size": len(self.vocabulary),
            "background_from": self.spec.background_from,
            "num_pairs": len(self.samples),
            "images_without_label": len(self.images_without_label),
            "labels_without_image": len(self.labels_without_image),
            "labels_without_image_examples": self.labels_without_image[:10],
        }


def _extensions(ext: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    items = (ext,) if isinstance(ext, str) else tuple(ext)
    return tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in items)


def _list_files(folder: Path, extensions: Tuple[str, ...], what: str) -> Dict[str, Path]:
    """stem -> file for the files of ``folder`` (not recursive) with one of ``extensions``."""
    if not folder.exists():
        raise DatasetError(f"{what} folder not found: {folder}")
    if not folder.is_dir():
        raise DatasetError(f"{what} path is not a folder: {folder}")
    found: Dict[str, Path] = {}
    for entry in os.scandir(folder):
        suffix = os.path.splitext(entry.name)[1].lower()
        if suffix not in extensions:
            continue
        try:
            kind_ok, folder_entry = entry.is_file(), entry.is_dir()
        except OSError:  # e.g. a loop of symbolic links
            kind_ok, folder_entry = False, False
        if folder_entry:
            continue
        if not kind_ok:  # a FIFO would hang a loader worker; a link loop or to nothing is an error
            try:
                check_regular_file(entry.path, what)
            except (InputFileError, OSError) as error:
                raise DatasetError(f"{error} (in the {what} folder {folder})") from None
        stem = os.path.splitext(entry.name)[0]
        if stem in found:
            raise DatasetError(f"two {what} files with the stem {stem!r} in {folder}: {found[stem].name} and "
                               f"{entry.name}; which one to pair by stem is ambiguous")
        found[stem] = Path(entry.path)
    return found


def pair_by_stem(images: Dict[str, Path], labels: Dict[str, Path]):
    """(samples sorted by stem, stems of images without label, stems of labels without image)."""
    common = sorted(set(images) & set(labels))
    samples = [Sample(stem, images[stem], labels[stem]) for stem in common]
    return samples, sorted(set(images) - set(labels)), sorted(set(labels) - set(images))


def _resolve(spec: DatasetSpec, image_dir: Path, label_dir: Path) -> ResolvedDataset:
    from ..data.vocabulary import load_vocabulary

    labels = _list_files(label_dir, _extensions(spec.label_ext), "label")
    images = _list_files(image_dir, _extensions(spec.image_ext), "image")
    if not labels:
        raise DatasetError(f"no label files ({', '.join(_extensions(spec.label_ext))}) in {label_dir}")
    if not images:
        raise DatasetError(f"no image files ({', '.join(_extensions(spec.image_ext))}) in {image_dir}")
    samples, lonely_images, lonely_labels = pair_by_stem(images, labels)
    if not samples:
        raise DatasetError(f"no image in {image_dir} has a label in {label_dir} with the same file stem "
                           f"({len(images)} images, {len(labels)} labels; e.g. image {next(iter(sorted(images)))!r}, "
                           f"label {next(iter(sorted(labels)))!r})")
    vocabulary = load_vocabulary(list(spec.vocabulary) if isinstance(spec.vocabulary, tuple) else spec.vocabulary)
    class_names = list(spec.class_names) if spec.class_names is not None else list(vocabulary)
    if spec.background_from is not None:
        if spec.background_from != len(class_names) - 1 or spec.background_from >= len(vocabulary):
            raise DatasetError(f"{spec.name}: background_from={spec.background_from} must be the last evaluated "
                               f"class ({len(class_names)} classes) and a vocabulary index ({len(vocabulary)} names)")
    elif len(vocabulary) != len(class_names):
        raise DatasetError(f"{spec.name}: the vocabulary has {len(vocabulary)} names but {len(class_names)} classes "
                           "are evaluated")
    if 0 <= spec.ignore_label < len(class_names):
        raise DatasetError(f"{spec.name}: the ignore label {spec.ignore_label} is a class index "
                           f"(0..{len(class_names) - 1}); it must be N={len(class_names)} or larger")
    return ResolvedDataset(spec, image_dir, label_dir, samples, vocabulary, class_names, lonely_images, lonely_labels)


def resolve_dataset(name: str, root: Optional[Union[str, os.PathLike]] = None,
                    registry: Optional[Dict[str, DatasetSpec]] = None) -> ResolvedDataset:
    """The named dataset (one of :data:`DATASETS`) under ``root`` (default :func:`default_data_root`)."""
    registry = DATASETS if registry is None else registry
    key = name.strip().lower()
    if key not in registry:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(registry)} (or give --images, "
                           "--labels, --vocab and --ignore for another dataset)")
    spec = registry[key]
    root = Path(os.path.expanduser(str(root))) if root is not None else default_data_root()
    if not root.is_dir():
        raise DatasetError(f"data root not found: {root} (set --data-root or DETECTRON2_DATASETS to the folder "
                           "holding the datasets prepared by the official datasets/prepare_*.py scripts)")
    return _resolve(spec, root / spec.image_dir, root / spec.label_dir)


def custom_dataset(images: Union[str, os.PathLike], labels: Union[str, os.PathLike],
                   vocabulary: Union[str, Sequence[str]], ignore_label: int, name: str = "custom") -> ResolvedDataset:
    """A dataset of any folder of images and folder of label maps (PNG or TIFF, value = class index)."""
    names = tuple(vocabulary) if not isinstance(vocabulary, str) else vocabulary
    spec = DatasetSpec(name, str(images), str(labels), IMAGE_EXTENSIONS, LABEL_EXTENSIONS, int(ignore_label), names)
    return _resolve(spec, Path(os.path.expanduser(str(images))), Path(os.path.expanduser(str(labels))))


# -- reading -----------------------------------------------------------------------------------

def read_image(path: Union[str, os.PathLike]) -> np.ndarray:
    """An image as detectron2's ``read_image(path, "RGB")``: (H, W, 3) uint8, EXIF orientation
    applied (:func:`sed_fast.inputs.image_files.read_rgb`: regular files only, the pixel limit, wide
    greyscale that detectron2 would clip refused)."""
    return read_rgb(path)[0]


_apply_exif_orientation = apply_exif_orientation


_INDEX_MODES = ("L", "P", "I;16", "I;16B", "I;16L", "I", "1")
_COLOUR_MODES = ("RGB", "RGBA", "P")


def read_label(path: Union[str, os.PathLike], palette=None, ignore_label: Optional[int] = None,
               invalid: str = "error") -> np.ndarray:
    """A label map as detectron2's evaluator reads it: ``np.array(Image.open(f), dtype=int)`` (a
    regular file, within the pixel limit).

    With ``palette`` (:class:`sed_fast.evaluation.palette.Palette`), colour label maps (RGB, RGBA,
    palette-mode) are read by colour: class index, ``ignore_label``, or -1 for a colour the
    palette lacks (an error naming it unless ``invalid="ignore"``)."""
    with open_image(path, what="label map") as image:
        if palette is not None and image.mode in _COLOUR_MODES:
            rgb = np.asarray(image.convert("RGB"))
            return palette.apply(rgb, ignore_label, invalid, where=str(path))
        if image.mode not in _INDEX_MODES:
            hint = (" (a colour-coded label map: pass --label-palette FILE, one 'R G B name' line per class in "
                    "vocabulary order, or --palette-from DATASET; see sed_fast/evaluation/README.md)"
                    if image.mode in ("RGB", "RGBA") else "")
            raise DatasetError(f"{path}: a label map must be a single-channel image (class index per pixel), "
                               f"got PIL mode {image.mode}{hint}")
        return np.array(image, dtype=np.int64)


class InvalidLabelError(DatasetError):
    pass


def map_label(label: np.ndarray, num_classes: int, ignore_label: int, invalid: str = "error",
              where: str = "") -> Tuple[np.ndarray, int]:
    """Ignore pixels -> ``num_classes`` (detectron2's ``gt[gt == ignore] = N``); other values outside
    ``0..N-1`` raise :class:`InvalidLabelError` or, with ``invalid="ignore"``, are ignored too.
    Returns (label as int64, number of invalid pixels)."""
    ignored = label == ignore_label
    bad = ~ignored & ((label < 0) | (label >= num_classes))
    count = int(bad.sum())
    if count and invalid != "ignore":
        values = np.unique(label[bad])
        shown = ", ".join(str(v) for v in values[:10]) + (" ..." if len(values) > 10 else "")
        raise InvalidLabelError(f"{where}: {count} pixel(s) with label values {shown}, not a class index "
                                f"(0..{num_classes - 1}) nor the ignore label {ignore_label} (pass "
                                "--invalid-labels ignore to ignore them, counted in the report)")
    out = label.copy()
    out[ignored | bad] = num_classes
    return out, count


class EvalDataset:
    """A map-style dataset (for ``torch.utils.data.DataLoader``) over ``indices`` of ``samples``.

    Item: ``{"index", "stem", "image": (3, H, W) uint8 tensor, "label": (H, W) int32 tensor with
    ignored pixels = N, "invalid": count of invalid label pixels, "error": None or a message}``.
    Decoding happens in the loader's worker processes.
    """

    def __init__(self, samples: Sequence[Sample], indices: Sequence[int], num_classes: int, ignore_label: int,
                 invalid_labels: str = "error", palette=None):
        self.samples = list(samples)
        self.indices = list(indices)
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.invalid_labels = invalid_labels
        self.palette = palette

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        """Never raises: a file that cannot be used gives ``"error"`` (the message), so the main
        process reports it in one clear line rather than as a worker-process traceback."""
        index = self.indices[position]
        sample = self.samples[index]
        item = {"index": index, "stem": sample.stem, "image": None, "label": None, "invalid": 0, "error": None,
                "unreadable": False}
        try:
            item.update(self._read(sample))
        except InvalidLabelError as error:  # readable, with values outside the classes: --invalid-labels
            item["error"] = str(error)
        except DatasetError as error:
            item.update(error=str(error), unreadable=True)
        except Exception as error:  # noqa: BLE001 - name the files, whatever the reason
            item.update(error=f"{sample.stem}: {type(error).__name__}: {error}", unreadable=True)
        return item

    def _read(self, sample: Sample) -> dict:
        import torch

        try:
            image = read_image(sample.image)
        except Exception as error:  # noqa: BLE001
            raise DatasetError(f"cannot read the image {sample.image}: {type(error).__name__}: {error}") from error
        try:
            label = read_label(sample.label, self.palette, self.ignore_label, self.invalid_labels)
        except DatasetError:
            raise
        except Exception as error:  # noqa: BLE001
            raise DatasetError(f"cannot read the label map {sample.label}: {type(error).__name__}: {error}") from error
        if label.ndim != 2:
            raise DatasetError(f"{sample.label}: a label map must be 2-D, got shape {label.shape}")
        if label.shape != image.shape[:2]:
            raise DatasetError(f"{sample.stem}: the image is {image.shape[1]}x{image.shape[0]} but its label map "
                               f"{sample.label.name} is {label.shape[1]}x{label.shape[0]} (width x height)")
        label, invalid = map_label(label, self.num_classes, self.ignore_label, self.invalid_labels,
                                   where=str(sample.label))
        return {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                "label": torch.from_numpy(label.astype(np.int32)), "invalid": invalid}


def collate(items: List[dict]) -> dict:
    """A batch as lists (images differ in size): the model takes a list of (3, H_i, W_i) tensors."""
    return {key: [item[key] for item in items] for key in items[0]} if items else {}

