"""Transparent pixels are composited on white by the one image reader (segment, eval, the API and
the web app read alike), instead of becoming whatever colour they store (usually black)."""
import numpy as np
import pytest
from PIL import Image

import sed_fast
from sed_fast.evaluation.datasets import read_image as eval_read_image
from sed_fast.inputs.image_files import TRANSPARENT_BACKGROUND, flatten_transparency, read_rgb


def cut_out(height=40, width=48) -> np.ndarray:
    """A red square on a transparent background that stores black, with a half-transparent stripe."""
    rgba = np.zeros((height, width, 4), np.uint8)
    rgba[4:20, 4:20] = (200, 30, 30, 255)
    rgba[:, 40:] = (0, 0, 200, 128)
    return rgba


def test_transparent_pixels_are_white_and_opaque_ones_unchanged(tmp_path):
    rgba = cut_out()
    Image.fromarray(rgba).save(tmp_path / "cut.png")
    pixels, info = read_rgb(tmp_path / "cut.png")
    assert TRANSPARENT_BACKGROUND == (255, 255, 255) and info.transparent and info.mode == "RGBA"
    assert (pixels[0, 0] == 255).all()                       # was stored black, fully transparent
    assert tuple(pixels[10, 10]) == (200, 30, 30)             # opaque: as stored
    blended = (rgba[0, 44, :3].astype(int) * 128 + 255 * 127) / 255
    assert np.abs(pixels[0, 44].astype(int) - blended).max() <= 1  # half transparent: half white


def test_every_kind_of_transparency(tmp_path):
    la = np.zeros((8, 8, 2), np.uint8)
    la[:4] = (90, 255)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    palette = Image.fromarray(np.array([[0, 1], [1, 1]], np.uint8), "P")
    palette.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    palette = palette.resize((8, 8), Image.NEAREST)
    palette.save(tmp_path / "p.png", transparency=0)
    la_pixels = read_rgb(tmp_path / "la.png")[0]
    assert (la_pixels[:4] == 90).all() and (la_pixels[4:] == 255).all()
    p_pixels, info = read_rgb(tmp_path / "p.png")
    assert info.transparent and (p_pixels[0, 0] == 255).all() and tuple(p_pixels[7, 7]) == (10, 200, 10)


def test_opaque_alpha_reads_as_detectron2_does(tmp_path):
    rgba = cut_out()
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    pixels, info = read_rgb(tmp_path / "opaque.png")
    assert not info.transparent and np.array_equal(pixels, rgba[..., :3])


def test_api_eval_and_web_app_readers_agree(tmp_path):
    Image.fromarray(cut_out()).save(tmp_path / "cut.png")
    expected = read_rgb(tmp_path / "cut.png")[0]
    assert np.array_equal(np.asarray(sed_fast.load_image(tmp_path / "cut.png")), expected)
    assert np.array_equal(np.asarray(eval_read_image(tmp_path / "cut.png")), expected)
    with Image.open(tmp_path / "cut.png") as upload:  # what the web app does with an upload
        assert np.array_equal(np.asarray(flatten_transparency(upload)), expected)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_images_without_transparency_are_only_converted(mode):
    image = Image.new(mode, (5, 5), 77 if mode == "L" else (1, 2, 3))
    assert np.array_equal(np.asarray(flatten_transparency(image)), np.asarray(image.convert("RGB")))


def test_segment_labels_transparent_areas_as_the_white_background(tmp_path, monkeypatch):
    """End to end through ``sed-fast segment``: a model that labels bright pixels 1 and dark ones 0
    sees the transparent (stored black) area as white."""
    import contextlib
    import io
    import json
    import sys

    import torch

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
    import sed_fast.api
    from fake_model import FakeModel
    from sed_fast import cli
    from sed_fast.inputs.images import as_image_list

    class Brightness(FakeModel):
        def __call__(self, images):
            batch = as_image_list(images)
            scores = []
            for image in batch.images:
                bright = (image.float().mean(0) > 128).float()
                scores.append(torch.stack([1 - bright, bright, torch.zeros_like(bright)]))
            return scores

    monkeypatch.setattr(sed_fast.api, "build_sed", lambda variant, **kwargs: Brightness())
    Image.fromarray(cut_out()).save(tmp_path / "cut.png")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(["segment", str(tmp_path / "cut.png"), "--vocab", "dark,bright,other", "--random-weights",
                         "--device", "cpu", "--save-label-npy", "--quiet", "--out", str(tmp_path / "out")])
    assert code == cli.EXIT_OK, err.getvalue()
    record = json.loads((tmp_path / "out" / "summary.json").read_text())["images"][0]
    labels = np.load(tmp_path / "out" / record["outputs"]["labels_npy"])
    assert labels[0, 0] == 1          # transparent, stored black: seen as the white background
    assert labels[10, 10] == 0        # the opaque dark red square
    assert record["transparency"] == "transparent pixels composited on white (255,255,255)"
