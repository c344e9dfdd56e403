"""Dataset layouts, pairing, reading and label checks (no model)."""
import numpy as np
import pytest
from PIL import Image

from eval_synthetic import make_layout, tiny_registry, write_label
from sed_fast.evaluation.datasets import (DATASETS, DatasetError, EvalDataset, custom_dataset, map_label,
                                          read_image, read_label, resolve_dataset)


def test_registry_matches_the_official_registrations():
    # sed/data/datasets/register_*.py of xb534/SED: folders, extensions, ignore labels
    expected = {
        "ade150": ("ADEChallengeData2016/images/validation", "ADEChallengeData2016/annotations_detectron2/validation",
                   ".png", 255),
        "ade847": ("ADE20K_2021_17_01/images_detectron2/validation",
                   "ADE20K_2021_17_01/annotations_detectron2/validation", ".tif", 65535),
        "pc59": ("VOCdevkit/VOC2010/JPEGImages", "VOCdevkit/VOC2010/annotations_detectron2/pc59_val", ".png", 255),
        "pc459": ("VOCdevkit/VOC2010/JPEGImages", "VOCdevkit/VOC2010/annotations_detectron2/pc459_val", ".tif", 459),
        "voc20": ("VOCdevkit/VOC2012/JPEGImages", "VOCdevkit/VOC2012/annotations_detectron2/val", ".png", 255),
        "voc20b": ("VOCdevkit/VOC2012/JPEGImages", "VOCdevkit/VOC2012/annotations_detectron2_bg/val", ".png", 255),
        "coco": ("coco-stuff/images/val2017", "coco-stuff/annotations_detectron2/val2017", ".png", 255),
    }
    assert set(DATASETS) == set(expected)
    for name, (images, labels, label_ext, ignore) in expected.items():
        spec = DATASETS[name]
        assert (spec.image_dir, spec.label_dir, spec.image_ext, spec.label_ext, spec.ignore_label) == \
            (images, labels, ".jpg", label_ext, ignore), name
        assert spec.vocabulary == name


def test_builtin_class_counts(tmp_path):
    from sed_fast.data.vocabulary import load_vocabulary

    counts = {"ade150": 150, "ade847": 847, "pc59": 59, "pc459": 459, "voc20": 20, "coco": 171}
    for name, n in counts.items():
        assert len(load_vocabulary(name)) == n
    voc20b = DATASETS["voc20b"]
    assert len(load_vocabulary("voc20b")) == 59 and len(voc20b.class_names) == 21
    assert voc20b.background_from == 20 and voc20b.class_names[-1] == "background"
    assert list(voc20b.class_names[:20]) == load_vocabulary("voc20") == load_vocabulary("voc20b")[:20]


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_each_layout_resolves_and_reads(tmp_path, monkeypatch, name):
    stems = make_layout(tmp_path, name, count=3)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))  # the default root, as SED
    dataset = resolve_dataset(name, registry=tiny_registry())
    assert [s.stem for s in dataset.samples] == stems
    assert dataset.images_without_label == ["zz_no_label"] and dataset.labels_without_image == ["aa_no_image"]
    spec = dataset.spec
    item = EvalDataset(dataset.samples, [1], dataset.num_classes, spec.ignore_label)[0]
    assert item["error"] is None
    raw = read_label(dataset.samples[1].label)
    assert raw.dtype == np.int64 and (raw == spec.ignore_label).any()
    if spec.label_ext == ".tif":
        with Image.open(dataset.samples[1].label) as image:
            assert image.mode.startswith("I;16")  # uint16 TIFF, value 65535 / 459 kept exactly
    label = item["label"].numpy()
    assert item["image"].shape == (3, *raw.shape) and item["image"].dtype.is_floating_point is False
    assert np.array_equal(label == dataset.num_classes, raw == spec.ignore_label)
    assert np.array_equal(label[raw != spec.ignore_label], raw[raw != spec.ignore_label])


def test_pairing_by_stem_not_by_position(tmp_path):
    # same number of files, different stems: detectron2 would zip them; here only "a" pairs
    (tmp_path / "i").mkdir()
    (tmp_path / "l").mkdir()
    for stem in ("a", "b"):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "i" / f"{stem}.jpg")
    for stem in ("a", "c"):
        write_label(tmp_path / "l" / f"{stem}.png", np.zeros((32, 32)), ".png")
    dataset = custom_dataset(tmp_path / "i", tmp_path / "l", ["x", "y"], 255)
    assert [s.stem for s in dataset.samples] == ["a"]
    assert dataset.images_without_label == ["b"] and dataset.labels_without_image == ["c"]


def test_missing_and_empty(tmp_path):
    with pytest.raises(DatasetError, match="data root not found"):
        resolve_dataset("ade150", tmp_path / "nope")
    with pytest.raises(DatasetError, match="label folder not found: .*annotations_detectron2"):
        resolve_dataset("ade150", tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset 'ade151'"):
        resolve_dataset("ade151", tmp_path)
    (tmp_path / "i").mkdir()
    (tmp_path / "l").mkdir()
    with pytest.raises(DatasetError, match="no label files"):
        custom_dataset(tmp_path / "i", tmp_path / "l", ["x"], 255)
    write_label(tmp_path / "l" / "a.png", np.zeros((32, 32)), ".png")
    with pytest.raises(DatasetError, match="no image files"):
        custom_dataset(tmp_path / "i", tmp_path / "l", ["x"], 255)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "i" / "b.jpg")
    with pytest.raises(DatasetError, match="no image .* has a label"):
        custom_dataset(tmp_path / "i", tmp_path / "l", ["x"], 255)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "i" / "b.png")
    with pytest.raises(DatasetError, match="ambiguous"):
        custom_dataset(tmp_path / "i", tmp_path / "l", ["x"], 255)


def test_ignore_label_must_not_be_a_class(tmp_path):
    make_layout(tmp_path, "voc20", count=1)
    with pytest.raises(DatasetError, match="ignore label 1 is a class index"):
        custom_dataset(tmp_path / DATASETS["voc20"].image_dir, tmp_path / DATASETS["voc20"].label_dir,
                       ["a", "b", "c"], 1)


def test_invalid_label_values():
    label = np.array([[0, 1, 2, 255], [3, 7, 255, 1]])
    with pytest.raises(DatasetError, match=r"f.png: 2 pixel\(s\) with label values 3, 7,"):
        map_label(label, 3, 255, where="f.png")
    mapped, count = map_label(label, 3, 255, invalid="ignore")
    assert count == 2 and mapped.tolist() == [[0, 1, 2, 3], [3, 3, 3, 1]]
    # N itself (value 3 here) is not silently ignored either, unlike detectron2
    mapped, count = map_label(np.array([[3]]), 3, 255, invalid="ignore")
    assert count == 1


def test_size_mismatch_and_unreadable_files_are_reported(tmp_path):
    (tmp_path / "i").mkdir()
    (tmp_path / "l").mkdir()
    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(tmp_path / "i" / "a.jpg")
    write_label(tmp_path / "l" / "a.png", np.zeros((40, 32)), ".png")
    (tmp_path / "i" / "b.jpg").write_bytes(b"not a jpeg")
    write_label(tmp_path / "l" / "b.png", np.zeros((32, 32)), ".png")
    dataset = custom_dataset(tmp_path / "i", tmp_path / "l", ["x"], 255)
    items = EvalDataset(dataset.samples, [0, 1], 1, 255)
    assert "is 40x32 but its label map a.png is 32x40" in items[0]["error"]
    assert "cannot read the image" in items[1]["error"] and "b.jpg" in items[1]["error"]


def test_rgb_label_is_refused(tmp_path):
    path = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    with pytest.raises(DatasetError, match="single-channel"):
        read_label(path)


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[:, :10] = 255  # white left third
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=100)
    read = read_image(tmp_path / "rot.jpg")
    assert read.shape == (30, 20, 3) and read.dtype == np.uint8
    assert read[:10].mean() > 200 and read[-10:].mean() < 50  # the white part is now on top
    Image.open(tmp_path / "rot.jpg").convert("L").save(tmp_path / "gray.png")
    assert read_image(tmp_path / "gray.png").shape == (20, 30, 3)  # gray -> RGB
