"""Semantic-segmentation metrics exactly as detectron2's ``SemSegEvaluator``.

Per image, the prediction is the argmax over classes at the original image size and ignored
ground-truth pixels are class N. The (N+1) x (N+1) int64 confusion matrix ``conf[pred, gt]``
counts ``bincount((N+1) * pred + gt)``. From it (``detectron2/evaluation/sem_seg_evaluation.py``):

* ``tp = diag[:-1]``, ``pos_gt = conf[:-1, :-1].sum(0)``, ``pos_pred = conf[:-1, :-1].sum(1)``,
  ``union = pos_gt + pos_pred - tp`` (the last row and column, ignore, are left out);
* ACC_c = tp / pos_gt where ``pos_gt > 0``; IoU_c = tp / union where ``pos_gt > 0`` and ``union > 0``;
  mACC, mIoU = the means over those classes; fwIoU = sum of IoU_c * pos_gt_c / sum(pos_gt);
  pACC = sum(tp) / sum(pos_gt). Reported in percent, undefined classes as NaN.

``legacy=True`` is detectron2 <= 0.6 (before commit f3c1bc19, July 2022): IoU_c is set for the
classes in the ground truth, but mIoU divides their sum by the number of classes present in the
ground truth *or* the prediction, so every class predicted somewhere but absent from the ground
truth counts as IoU 0. On datasets where many classes never occur (PC-459, ADE-847) this lowers
mIoU; it is why numbers computed with old and new detectron2 differ.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["ConfusionMatrix", "compute_metrics", "summary_keys", "copypaste_lines", "confusion_from_labels"]

SUMMARY_KEYS = ("mIoU", "fwIoU", "mACC", "pACC")


def confusion_from_labels(pred: torch.Tensor, gt: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The (N+1) x (N+1) int64 confusion matrix of one or more label maps (any matching shapes;
    ``gt`` has ignored pixels = N, ``pred`` values in 0..N). On the tensors' device."""
    size = num_classes + 1
    index = size * pred.reshape(-1).to(torch.int64) + gt.reshape(-1).to(torch.int64)
    return torch.bincount(index, minlength=size * size).reshape(size, size)


class ConfusionMatrix:
    """The running confusion matrix, kept on ``device`` (int64)."""

    def __init__(self, num_classes: int, device="cpu", background_from: Optional[int] = None):
        self.num_classes = num_classes
        self.background_from = background_from
        self.matrix = torch.zeros(num_classes + 1, num_classes + 1, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """Add one image: ``pred`` (H, W) vocabulary indices, ``gt`` (H, W) with ignore = N."""
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(gt.shape)} differ in size")
        self.matrix += confusion_from_labels(self.map_prediction(pred), gt.to(self.matrix.device), self.num_classes)

    def map_prediction(self, pred: torch.Tensor) -> torch.Tensor:
        """Vocabulary indices -> evaluated classes (VOC-b: every index >= 20 is background, 20).
        Otherwise the vocabulary is the N classes (checked when the dataset is resolved), so
        predictions are below N without a (synchronising) check here."""
        pred = pred.to(self.matrix.device)
        if self.background_from is not None:
            pred = pred.clamp(max=self.background_from)
        return pred

    def numpy(self) -> np.ndarray:
        return self.matrix.cpu().numpy()


def _nan_to_none(value: float):
    return None if value != value else float(value)


def compute_metrics(conf: np.ndarray, class_names: Sequence[str], legacy: bool = False) -> "OrderedDict[str, float]":
    """detectron2's ``SemSegEvaluator.evaluate`` on a confusion matrix, keys in its order:
    ``mIoU, fwIoU, IoU-<name>..., mACC, pACC, ACC-<name>...`` (percent, NaN where undefined)."""
    conf = np.asarray(conf, dtype=np.int64)
    n = len(class_names)
    if conf.shape != (n + 1, n + 1):
        raise ValueError(f"confusion matrix of shape {conf.shape} for {n} classes; expected {(n + 1, n + 1)}")
    acc = np.full(n, np.nan, dtype=float)
    iou = np.full(n, np.nan, dtype=float)
    tp = conf.diagonal()[:-1].astype(float)
    pos_gt = np.sum(conf[:-1, :-1], axis=0).astype(float)
    pos_pred = np.sum(conf[:-1, :-1], axis=1).astype(float)
    union = pos_gt + pos_pred - tp
    acc_valid = pos_gt > 0
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # no labelled pixel at all: NaN, as detectron2
        class_weights = pos_gt / np.sum(pos_gt)
        acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
        macc = np.sum(acc[acc_valid]) / np.sum(acc_valid)
        if legacy:
            iou_valid = (pos_gt + pos_pred) > 0
            iou[acc_valid] = tp[acc_valid] / union[acc_valid]
            miou = np.sum(iou[acc_valid]) / np.sum(iou_valid)
            fiou = np.sum(iou[acc_valid] * class_weights[acc_valid])
        else:
            iou_valid = np.logical_and(acc_valid, union > 0)
            iou[iou_valid] = tp[iou_valid] / union[iou_valid]
            miou = np.sum(iou[iou_valid]) / np.sum(iou_valid)
            fiou = np.sum(iou[iou_valid] * class_weights[iou_valid])
        pacc = np.sum(tp) / np.sum(pos_gt)

    res: "OrderedDict[str, float]" = OrderedDict()
    res["mIoU"] = 100 * miou
    res["fwIoU"] = 100 * fiou
    for i, name in enumerate(class_names):
        res[f"IoU-{name}"] = 100 * iou[i]
    res["mACC"] = 100 * macc
    res["pACC"] = 100 * pacc
    for i, name in enumerate(class_names):
        res[f"ACC-{name}"] = 100 * acc[i]
    return res


def summary_keys(results: Dict[str, float]) -> List[str]:
    """The keys detectron2's ``print_csv_format`` prints: those without a ``-``."""
    return [key for key in results if "-" not in key]


def copypaste_lines(results: Dict[str, float], task: str = "sem_seg") -> List[str]:
    """The three ``copypaste:`` messages of detectron2's ``print_csv_format``."""
    keys = summary_keys(results)
    return [f"copypaste: Task: {task}",
            "copypaste: " + ",".join(keys),
            "copypaste: " + ",".join("{0:.4f}".format(results[key]) for key in keys)]


def per_class(conf: np.ndarray, class_names: Sequence[str], legacy: bool = False) -> List[dict]:
    """Per-class figures: name, IoU, ACC (percent or None), ground-truth and predicted pixels."""
    results = compute_metrics(conf, class_names, legacy=legacy)
    conf = np.asarray(conf)
    pos_gt = conf[:-1, :-1].sum(0)
    pos_pred = conf[:-1, :-1].sum(1)
    return [{"index": i, "name": name, "iou": _nan_to_none(results[f"IoU-{name}"]),
             "acc": _nan_to_none(results[f"ACC-{name}"]), "gt_pixels": int(pos_gt[i]), "pred_pixels": int(pos_pred[i])}
            for i, name in enumerate(class_names)]


def summary(results: Dict[str, float]) -> Dict[str, Optional[float]]:
    return {key: _nan_to_none(results[key]) for key in summary_keys(results)}
