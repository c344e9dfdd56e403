"""Colour-coded label maps (``--label-palette``, ``--palette-from``) and unreadable files
(``--skip-unreadable``) in ``sed-fast eval`` (issue 23, items 1 and 2)."""
import json

import numpy as np
import pytest
from PIL import Image

from eval_synthetic import TINY, write_label
from sed_fast.evaluation.datasets import read_label
from sed_fast.evaluation.palette import PaletteError, builtin_palette, load_palette, voc_colormap
from test_eval_cli import COMMON, run_eval

COLOURS = [(128, 64, 128), (220, 20, 60), (107, 142, 35)]  # one per TINY class
VOID = (0, 0, 0)


def write_palette(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def colour_dataset(tmp_path):
    """The same labels twice: as index PNGs (ignore 255) and as RGB colour maps (ignore = black)."""
    images, index, colour = tmp_path / "images", tmp_path / "index", tmp_path / "colour"
    for folder in (images, index, colour):
        folder.mkdir()
    rng = np.random.default_rng(3)
    lut = np.array(COLOURS + [VOID], dtype=np.uint8)
    for i in range(3):
        h, w = 36 + 4 * i, 44
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"img{i}.png")
        label = rng.integers(0, 3, (h, w))
        label[:2] = 255
        write_label(index / f"img{i}.png", label, ".png")
        Image.fromarray(lut[np.where(label == 255, 3, label)]).save(colour / f"img{i}.png")
    palette = write_palette(tmp_path / "palette.txt", [
        "# R G B name", f"{COLOURS[0][0]} {COLOURS[0][1]} {COLOURS[0][2]} cat",
        f"{COLOURS[1][0]},{COLOURS[1][1]},{COLOURS[1][2]}", f"{COLOURS[2][0]} {COLOURS[2][1]} {COLOURS[2][2]} Grass",
        "", "ignore 0 0 0 void"])
    return images, index, colour, palette


def _custom(images, labels):
    return ["--images", images, "--labels", labels, "--vocab", ",".join(TINY), "--ignore", "255"]


def test_rgb_label_maps_read_with_a_palette_equal_the_index_maps(tmp_path, shared_build, colour_dataset):
    images, index, colour, palette = colour_dataset
    code, _, err = run_eval([*_custom(images, index), "--out", tmp_path / "a", *COMMON])
    assert code == 0, err
    code, _, err = run_eval([*_custom(images, colour), "--label-palette", palette, "--out", tmp_path / "b", *COMMON])
    assert code == 0, err
    want, got = np.load(tmp_path / "a" / "confusion.npy"), np.load(tmp_path / "b" / "confusion.npy")
    assert np.array_equal(got, want) and got[:, -1].sum() > 0  # the black pixels were ignored
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert results["config"]["label_palette"] == str(palette)


def test_rgb_label_maps_without_a_palette_say_what_to_do(tmp_path, shared_build, colour_dataset):
    images, _, colour, _ = colour_dataset
    code, _, err = run_eval([*_custom(images, colour), "--out", tmp_path / "o", *COMMON])
    assert code == 2, err
    assert "img0.png" in err and "--label-palette" in err and "--palette-from" in err and "Traceback" not in err
    assert "rerun the same command with --resume" not in err  # a resume would stop on the same file


def test_an_unknown_colour_names_the_file_the_colour_and_its_pixels(tmp_path, shared_build, colour_dataset):
    images, _, colour, palette = colour_dataset
    with Image.open(colour / "img1.png") as image:
        pixels = np.array(image)
    pixels[5:7, 10:13] = (1, 2, 3)  # 6 pixels of a colour the palette lacks
    Image.fromarray(pixels).save(colour / "img1.png")
    code, _, err = run_eval([*_custom(images, colour), "--label-palette", palette, "--out", tmp_path / "o", *COMMON])
    assert code == 2, err
    assert "img1.png" in err and "colour 1,2,3 (6 pixel(s), first at x=10, y=5)" in err
    assert "--invalid-labels ignore" in err
    code, _, err = run_eval([*_custom(images, colour), "--label-palette", palette, "--out", tmp_path / "o2", *COMMON,
                             "--invalid-labels", "ignore"])
    assert code == 0, err
    assert json.loads((tmp_path / "o2" / "results.json").read_text())["invalid_label_pixels"] == 6


@pytest.mark.parametrize("lines, message", [
    (["1 2 3 cat", "4 5 6 dog"], "2 class colour(s) but the dataset has 3 classes"),
    (["1 2 3 cat", "4 5 6 grass", "7 8 9 dog"], "names class 1 'grass'"),
    (["1 2 3", "1 2 3", "7 8 9"], "already on line 1"),
    (["1 2 3", "4 5 300", "7 8 9"], "0..255"),
    (["1 2", "4 5 6", "7 8 9"], "expected 'R G B name'"),
])
def test_bad_palettes_are_usage_errors(tmp_path, colour_dataset, lines, message):
    images, _, colour, _ = colour_dataset
    palette = write_palette(tmp_path / "bad.txt", lines)
    code, _, err = run_eval([*_custom(images, colour), "--label-palette", palette, "--out", tmp_path / "o", *COMMON])
    assert code == 2 and message in err and "Traceback" not in err, err


def test_palette_options_exclude_each_other_and_only_voc_has_an_official_palette(tmp_path, colour_dataset):
    images, _, colour, palette = colour_dataset
    code, _, err = run_eval([*_custom(images, colour), "--label-palette", palette, "--palette-from", "voc20",
                             "--out", tmp_path / "o", *COMMON])
    assert code == 2 and "exclude each other" in err
    code, _, err = run_eval([*_custom(images, colour), "--palette-from", "ade150", "--out", tmp_path / "o", *COMMON])
    assert code == 2 and "no official colour palette" in err and "voc20" in err and "--label-palette" in err
    with pytest.raises(PaletteError, match="no official"):
        builtin_palette("coco")


def test_voc_palette_reads_segmentation_class_pngs(tmp_path):
    """A VOC SegmentationClass PNG: palette mode, index i drawn in colour map entry i, 255 = void."""
    cmap = voc_colormap()
    assert cmap[0].tolist() == [0, 0, 0] and cmap[1].tolist() == [128, 0, 0] and cmap[15].tolist() == [192, 128, 128]
    assert cmap[255].tolist() == [224, 224, 192]
    indices = np.array([[0, 1, 15, 20], [255, 255, 3, 0]], dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(cmap.ravel().tolist())
    image.save(tmp_path / "2007_000032.png")
    voc20 = read_label(tmp_path / "2007_000032.png", builtin_palette("voc20"), ignore_label=255)
    assert voc20.tolist() == [[255, 0, 14, 19], [255, 255, 2, 255]]  # background is not a voc20 class
    voc20b = read_label(tmp_path / "2007_000032.png", builtin_palette("voc20b"), ignore_label=255)
    assert voc20b.tolist() == [[20, 0, 14, 19], [255, 255, 2, 20]]  # class 20: background
    # without a palette the same file is read as its indices, as detectron2 does
    assert read_label(tmp_path / "2007_000032.png").tolist() == indices.tolist()


def test_palette_file_format(tmp_path):
    palette = load_palette(write_palette(tmp_path / "p.txt", [
        "\ufeff# comment", "10 20 30 sky  # inline comment", "40,50,60", "ignore 0 0 0", "IGNORE 255,255,255 void"]))
    assert palette.colours == ((10, 20, 30), (40, 50, 60)) and palette.names == ("sky", "")
    assert palette.ignored == ((0, 0, 0), (255, 255, 255))
    rgb = np.array([[[40, 50, 60], [0, 0, 0], [10, 20, 30]]], dtype=np.uint8)
    assert palette.apply(rgb, ignore_label=99).tolist() == [[1, 99, 0]]
    assert palette.apply(np.array([[[9, 9, 9]]], np.uint8), 99, invalid="ignore").tolist() == [[-1]]


# -- unreadable files -------------------------------------------------------------------------
def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_unreadable_image_says_which_fix_applies_and_can_be_skipped(tmp_path, shared_build, colour_dataset):
    images, index, _, _ = colour_dataset
    _truncate(images / "img1.png")
    args = [*_custom(images, index), *COMMON]
    code, _, err = run_eval([*args, "--out", tmp_path / "o"])
    assert code == 2, err
    assert "img1.png" in err and "Replace the file" in err and "--skip-unreadable" in err and "Traceback" not in err
    # the images finished before it are saved: the hint then says how to go on with them
    assert "--resume --skip-unreadable" in err
    code, _, err = run_eval([*args, "--out", tmp_path / "o", "--resume", "--skip-unreadable"])
    assert code == 0, err
    assert "skipped" in err and "img1.png" in err
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["images"]["evaluated"] == 2 and results["images"]["skipped_unreadable"] == 1
    assert [entry["stem"] for entry in results["skipped_unreadable"]] == ["img1"]
    assert "img1.png" in results["skipped_unreadable"][0]["error"]
    log = (tmp_path / "o" / "log.txt").read_text()
    assert "skipped 1 unreadable file(s)" in log and "img1.png" in log
    # the figures are those of the two readable images
    code, _, err = run_eval([*_custom(images, index), *COMMON, "--out", tmp_path / "two", "--skip-unreadable",
                             "--workers", "1"])
    assert code == 0, err
    assert np.array_equal(np.load(tmp_path / "two" / "confusion.npy"), np.load(tmp_path / "o" / "confusion.npy"))


# -- --save-predictions ------------------------------------------------------------------------
def test_saved_predictions_are_the_scored_label_maps(tmp_path, shared_build, colour_dataset):
    images, index, colour, palette = colour_dataset
    out = tmp_path / "o"
    argv = [*_custom(images, colour), "--label-palette", palette, "--out", out, *COMMON, "--save-predictions"]
    code, _, err = run_eval(argv)
    assert code == 0, err
    (out / "predictions" / "old_run.png").write_bytes(b"stale")  # a fresh run clears its own folder
    code, _, err = run_eval([*argv, "--overwrite"])
    assert code == 0, err
    saved = sorted(p.name for p in (out / "predictions").iterdir())
    assert saved == ["img0.png", "img1.png", "img2.png"]
    confusion = np.zeros((4, 4), dtype=np.int64)
    for name in saved:
        with Image.open(out / "predictions" / name) as png:
            assert png.mode == "P" and png.text.get("sed_fast") == "random_weights"
            assert png.getpalette()[:9] == [c for rgb in COLOURS for c in rgb]  # the dataset's own colours
            pred = np.array(png).astype(np.int64)
        gt = read_label(index / name)
        assert pred.shape == gt.shape and pred.max() < 3
        gt[gt == 255] = 3
        confusion += np.bincount(4 * pred.ravel() + gt.ravel(), minlength=16).reshape(4, 4)
    assert np.array_equal(confusion, np.load(out / "confusion.npy"))
