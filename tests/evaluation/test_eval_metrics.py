"""The metrics against an independent computation on hand-built label maps (no confusion matrix)."""
import math

import numpy as np
import pytest
import torch

from sed_fast.evaluation.metrics import (ConfusionMatrix, compute_metrics, confusion_from_labels, copypaste_lines,
                                         summary_keys)

IGNORE = 255


def direct_metrics(pairs, num_classes, legacy=False):
    """mIoU etc. in percent, from per-class pixel sets (only labelled pixels count, as detectron2)."""
    inter = np.zeros(num_classes)
    union = np.zeros(num_classes)
    gt_count = np.zeros(num_classes)
    pred_count = np.zeros(num_classes)
    for pred, gt in pairs:
        labelled = gt != IGNORE
        for c in range(num_classes):
            g = (gt == c) & labelled
            p = (pred == c) & labelled
            inter[c] += (g & p).sum()
            union[c] += (g | p).sum()
            gt_count[c] += g.sum()
            pred_count[c] += p.sum()
    in_gt = [c for c in range(num_classes) if gt_count[c] > 0]
    iou = {c: inter[c] / union[c] for c in in_gt}
    acc = {c: inter[c] / gt_count[c] for c in in_gt}
    if legacy:
        counted = [c for c in range(num_classes) if gt_count[c] > 0 or pred_count[c] > 0]
        miou = sum(iou.values()) / len(counted)
    else:
        miou = sum(iou.values()) / len(iou)
    total = gt_count.sum()
    return {"mIoU": 100 * miou, "fwIoU": 100 * sum(iou[c] * gt_count[c] / total for c in iou),
            "mACC": 100 * sum(acc.values()) / len(acc), "pACC": 100 * inter.sum() / total,
            "iou": {c: 100 * v for c, v in iou.items()}, "acc": {c: 100 * v for c, v in acc.items()}}


def confusion_of(pairs, num_classes, background_from=None):
    matrix = ConfusionMatrix(num_classes, background_from=background_from)
    for pred, gt in pairs:
        gt = np.where(gt == IGNORE, num_classes, gt)
        matrix.update(torch.from_numpy(pred), torch.from_numpy(gt))
    return matrix.numpy()


# 4 classes: class 3 is predicted (also on ignored pixels) but never in the ground truth; class 2
# is in the ground truth but never predicted; the third image is all ignore.
GT1 = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [IGNORE, IGNORE, 2, 2]])
PRED1 = np.array([[0, 3, 1, 1], [0, 0, 3, 1], [3, 3, 0, 0]])
GT2 = np.array([[1, 1, 1], [2, 2, 0]])
PRED2 = np.array([[1, 1, 0], [0, 1, 0]])
GT3 = np.full((2, 5), IGNORE)
PRED3 = np.array([[3, 3, 3, 2, 2], [1, 1, 1, 1, 1]])
CASE = [(PRED1, GT1), (PRED2, GT2), (PRED3, GT3)]
NAMES = ["a", "b", "c", "d"]


@pytest.mark.parametrize("legacy", [False, True])
def test_against_direct_computation(legacy):
    got = compute_metrics(confusion_of(CASE, 4), NAMES, legacy=legacy)
    want = direct_metrics(CASE, 4, legacy=legacy)
    for key in ("mIoU", "fwIoU", "mACC", "pACC"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    for c, name in enumerate(NAMES):
        if c in want["iou"]:
            assert got[f"IoU-{name}"] == pytest.approx(want["iou"][c], abs=1e-9)
            assert got[f"ACC-{name}"] == pytest.approx(want["acc"][c], abs=1e-9)
        else:  # class d: absent from the ground truth, so undefined (NaN) under both rules
            assert math.isnan(got[f"IoU-{name}"]) and math.isnan(got[f"ACC-{name}"])
    assert got["IoU-c"] == 0.0  # in the ground truth, never predicted: IoU 0, counted


def test_legacy_rule_differs_by_the_predicted_only_class():
    conf = confusion_of(CASE, 4)
    current = compute_metrics(conf, NAMES)
    legacy = compute_metrics(conf, NAMES, legacy=True)
    # three classes in the ground truth; legacy also counts d (predicted on labelled pixels) as IoU 0
    assert legacy["mIoU"] == pytest.approx(current["mIoU"] * 3 / 4)
    for key in ("fwIoU", "mACC", "pACC"):
        assert legacy[key] == pytest.approx(current[key])


def test_prediction_on_ignored_pixels_only_does_not_count():
    pairs = [(np.array([[0, 1, 2]]), np.array([[0, 1, IGNORE]]))]  # class 2 predicted only where ignored
    conf = confusion_of(pairs, 3)
    assert compute_metrics(conf, ["a", "b", "c"], legacy=True)["mIoU"] == pytest.approx(100.0)
    assert compute_metrics(conf, ["a", "b", "c"])["mIoU"] == pytest.approx(100.0)


def test_hand_computed_numbers():
    conf = confusion_of([(np.array([[0, 1, 1, 1]]), np.array([[0, 0, 1, 1]]))], 2)
    res = compute_metrics(conf, ["x", "y"])
    assert res["IoU-x"] == pytest.approx(50.0) and res["IoU-y"] == pytest.approx(200 / 3)
    assert res["mIoU"] == pytest.approx((50 + 200 / 3) / 2)
    assert res["fwIoU"] == pytest.approx((50 + 200 / 3) / 2)
    assert res["mACC"] == pytest.approx(75.0) and res["pACC"] == pytest.approx(75.0)
    assert list(res) == ["mIoU", "fwIoU", "IoU-x", "IoU-y", "mACC", "pACC", "ACC-x", "ACC-y"]  # detectron2's order


def test_all_ignore_images_change_nothing_and_alone_give_nan():
    base = confusion_of(CASE[:2], 4)
    assert np.array_equal(base[:-1, :-1], confusion_of(CASE, 4)[:-1, :-1])
    alone = compute_metrics(confusion_of(CASE[2:], 4), NAMES)
    assert all(math.isnan(alone[k]) for k in ("mIoU", "mACC", "pACC"))
    assert alone["fwIoU"] == 0.0  # detectron2: a sum over no class


def test_confusion_matrix_is_detectron2s_bincount():
    rng = np.random.default_rng(0)
    n = 5
    pred = rng.integers(0, n, (7, 9))
    gt = rng.integers(0, n + 1, (7, 9))  # n = ignore after mapping
    want = np.bincount((n + 1) * pred.reshape(-1) + gt.reshape(-1), minlength=(n + 1) ** 2).reshape(n + 1, n + 1)
    got = confusion_from_labels(torch.from_numpy(pred), torch.from_numpy(gt), n)
    assert got.dtype == torch.int64 and np.array_equal(got.numpy(), want)
    assert got[pred[0, 0], gt[0, 0]] >= 1  # rows are predictions, columns ground truth


def test_voc_background_mapping():
    # vocabulary of 6 names, 4 evaluated classes: indices >= 3 are background (class 3)
    pred = np.array([[0, 3, 4, 5]])
    gt = np.array([[0, 3, 3, 1]])
    conf = confusion_of([(pred, gt)], 4, background_from=3)
    assert conf[3, 3] == 2 and conf[3, 1] == 1 and conf[0, 0] == 1
    assert conf.sum() == 4


def test_copypaste_lines_format():
    res = compute_metrics(confusion_of(CASE, 4), ["wall-brick", "b", "c", "d"])
    lines = copypaste_lines(res)
    assert summary_keys(res) == ["mIoU", "fwIoU", "mACC", "pACC"]  # class names with '-' are not summary keys
    assert lines[0] == "copypaste: Task: sem_seg"
    assert lines[1] == "copypaste: mIoU,fwIoU,mACC,pACC"
    values = lines[2][len("copypaste: "):].split(",")
    assert values == ["{0:.4f}".format(res[k]) for k in ("mIoU", "fwIoU", "mACC", "pACC")]


def test_wrong_shapes_are_errors():
    with pytest.raises(ValueError, match="for 3 classes"):
        compute_metrics(np.zeros((3, 3), dtype=np.int64), ["a", "b", "c"])
    with pytest.raises(ValueError, match="differ in size"):
        ConfusionMatrix(2).update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))


def test_results_and_comparison_report():
    import json

    from sed_fast.evaluation.report import build_results, markdown

    a = confusion_of(CASE, 4)
    b = a.copy()
    b[1, 1] -= 1  # one pixel of class b moved to class a in the second model
    b[0, 1] += 1
    results = build_results(confusion={"fast": a, "reference": b}, class_names=NAMES, legacy=True, config={},
                            dataset={"name": "t", "num_classes": 4}, counts={"evaluated": 3}, timing={}, env={},
                            counters={"agree_pixels": 9, "compared_pixels": 10})
    json.dumps(results, allow_nan=False)  # NaN written as null
    fast = results["models"]["fast"]
    assert fast["rule"] == "legacy"
    assert fast["summary"]["mIoU"] == pytest.approx(compute_metrics(a, NAMES, legacy=True)["mIoU"])
    assert fast["summary_current_rule"]["mIoU"] == pytest.approx(compute_metrics(a, NAMES)["mIoU"])
    assert [row["iou"] is None for row in fast["per_class"]] == [False, False, False, True]
    comparison = results["comparison"]
    assert comparison["pixel_agreement"] == pytest.approx(0.9)
    assert [d["name"] for d in comparison["classes_with_different_iou"]] == ["b", "a"]  # largest change first
    assert comparison["summary_difference"]["pACC"] == pytest.approx(100 / a[:-1, :-1].sum())
    text = markdown(results)
    assert "| fast |" in text and "| reference |" in text and "n/a" in text  # class d: not in the ground truth
