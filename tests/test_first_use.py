"""What a new user meets first: help texts, messages, the Python defaults and helpers (issue 23)."""
import contextlib
import io
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from sed_fast import cli
from sed_fast.segment import cli as segment_cli


def run_main(argv):
    """``sed-fast ...`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_bench_kernels_help_names_the_command():
    code, out, _ = run_main(["bench-kernels", "--help"])
    assert code == 0 and out.startswith("usage: sed-fast bench-kernels")


def test_video_files_in_an_image_folder_are_reported(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    for name in ("clip.mp4", "take2.MOV"):
        (tmp_path / name).write_bytes(b"\0" * 16)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        items = segment_cli.collect_images([str(tmp_path)], quiet=True)  # said even with --quiet: inputs are left out
    assert [item.path.name for item in items] == ["a.png"]
    assert "skipped 2 video file(s)" in err.getvalue()
    assert "clip.mp4" in err.getvalue() and "take2.MOV" in err.getvalue()


def test_trace_on_a_cpu_only_machine_prints_no_cuda_error(tmp_path):
    """Kineto logs ``gpuGetDeviceCount failed`` from C++ (fd 2) when there is no CUDA device."""
    script = textwrap.dedent(f"""
        import os
        import torch
        from sed_fast.bench.profile import _quiet_kineto
        with _quiet_kineto():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                torch.ones(8).add_(1)
            prof.export_chrome_trace({str(tmp_path / "trace.json")!r})
        print("ok", os.environ.get("KINETO_LOG_LEVEL"))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.split()[0] == "ok", result.stderr
    assert "gpuGetDeviceCount" not in result.stderr and "ERROR" not in result.stderr
    assert (tmp_path / "trace.json").stat().st_size > 0
    assert result.stdout.split()[1] == "None"  # the variable is restored (it was unset)


# -- segment's outputs ------------------------------------------------------------------------
def _fake_segment(tmp_path, monkeypatch, names, out, extra=()):
    import sed_fast.api
    from fake_model import FakeModel

    monkeypatch.setattr(sed_fast.api, "build_sed", lambda variant, **kwargs: FakeModel())
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    from PIL import Image
    import numpy as np

    for i, name in enumerate(names):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / name)
    return run_main(["segment", *[folder / n for n in names], "--vocab", "cat,dog,grass", "--random-weights",
                     "--device", "cpu", "--impl", "reference", "--out", out, *extra])


def test_label_npy_equals_the_palette_png(tmp_path, monkeypatch):
    import json

    import numpy as np
    from PIL import Image

    code, _, err = _fake_segment(tmp_path, monkeypatch, ["a.png"], tmp_path / "o", ["--save-label-npy", "--quiet"])
    assert code == 0, err
    record = json.loads((tmp_path / "o" / "summary.json").read_text())["images"][0]
    array = np.load(tmp_path / "o" / record["outputs"]["labels_npy"])
    with Image.open(tmp_path / "o" / record["outputs"]["labels"]) as png:
        assert png.mode == "P" and np.array_equal(np.array(png), array)
    assert array.dtype == np.uint8 and array.shape == (40, 48) and array.max() < 3


def test_reused_out_lists_the_stale_files_and_the_run_prints_its_total_time(tmp_path, monkeypatch):
    import json

    out = tmp_path / "o"
    code, _, err = _fake_segment(tmp_path, monkeypatch, ["a.png", "b.png"], out)
    assert code == 0, err
    assert "stale" not in err and json.loads((out / "summary.json").read_text())["stale_files"] == []
    assert re.search(r"2 of 2 image\(s\) segmented in \d+\.\d s in all", err)
    (out / ".sed_fast.lock").write_text("")  # another tool's file: not an output
    (out / "notes.txt").write_text("mine")
    code, _, err = _fake_segment(tmp_path, monkeypatch, ["b.png"], out)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stale_files"] == ["a_labels.png", "a_overlay.png"]  # nothing deleted, all listed
    assert (out / "a_labels.png").exists() and (out / "notes.txt").exists()
    assert "2 output file(s) of an earlier run" in err and "a_labels.png" in err
    assert summary["seconds_total"] > 0
    code, out_text, _ = run_main(["segment", "--help"])
    assert "stale_files" in " ".join(out_text.split())


# -- the Python defaults and helpers -----------------------------------------------------------
def test_build_sed_defaults_to_the_fast_model_and_falls_back_with_a_warning(monkeypatch):
    import warnings

    import sed_fast
    import sed_fast.models.fast.model as fast_module
    from sed_fast.models.fast import SEDFast
    from sed_fast.models.sed import SEDReference

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sed_fast.RandomWeightsWarning)
        model = sed_fast.build_sed("b", device="meta")
        assert isinstance(model, SEDFast)
        assert type(sed_fast.build_sed("b", impl="reference", device="meta")) is SEDReference

        class Broken:
            def __init__(self, *args, **kwargs):
                raise ImportError("no kernels here")

        monkeypatch.setattr(fast_module, "SEDFast", Broken)
        with pytest.warns(sed_fast.FastFallbackWarning, match="no kernels here"):
            model = sed_fast.build_sed("b", device="meta")
        assert type(model) is SEDReference
        with pytest.raises(ImportError, match="no kernels here"):  # asked for by name: no substitute
            sed_fast.build_sed("b", impl="fast", device="meta")
        with pytest.raises(ValueError, match="unknown impl"):
            sed_fast.build_sed("b", impl="quick", device="meta")


def test_load_image_applies_exif_orientation_and_the_readme_way_warns_nothing(tmp_path):
    import warnings

    import numpy as np
    from PIL import Image

    import sed_fast

    pixels = np.zeros((30, 50, 3), dtype=np.uint8)
    pixels[:, :10] = 255  # a white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    image = sed_fast.load_image(tmp_path / "phone.jpg")
    assert image.mode == "RGB" and image.size == (30, 50)  # upright: 30 wide, 50 high
    upright = np.array(image)
    assert upright[:10].mean() > 200 and upright[-10:].mean() < 50  # the band is on top now
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # np.asarray(image) would be read-only: torch warns about it
        tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    assert tensor.shape == (3, 50, 30) and tensor.dtype == torch.uint8


# -- the first picture: a scene segmented with the names of what is in it (issue 37) -----------------
def _relative_luminance(colour) -> float:
    """WCAG 2 relative luminance of an sRGB colour (0..255 per channel)."""
    def linear(value):
        value = value / 255
        return value / 12.92 if value <= 0.04045 else ((value + 0.055) / 1.055) ** 2.4
    red, green, blue = (linear(float(v)) for v in colour)
    return 0.2126 * red + 0.7152 * green + 0.0722 * blue


def contrast_ratio(first, second) -> float:
    """WCAG 2 contrast ratio, 1..21."""
    light, dark = sorted((_relative_luminance(first), _relative_luminance(second)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


def _banner_colours(strip):
    """(background, text colour) of a drawn banner: its most common colour and the pixel farthest from it."""
    import numpy as np

    pixels = np.asarray(strip.convert("RGB")).reshape(-1, 3).astype(int)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    background = colours[counts.argmax()]
    text = pixels[np.abs(pixels - background).sum(1).argmax()]
    return tuple(background), tuple(text)


def test_contrast_ratio_matches_wcag_reference_values():
    assert contrast_ratio((0, 0, 0), (255, 255, 255)) == pytest.approx(21.0)
    assert contrast_ratio((119, 119, 119), (255, 255, 255)) == pytest.approx(4.48, abs=0.01)  # the usual example


def test_demo_segments_the_scene_with_the_names_of_what_it_shows():
    import numpy as np

    from sed_fast import demo
    from sed_fast.data.sample_scene import SAMPLE_SCENE_CLASSES, draw_sample_scene

    assert demo.build_parser().parse_args([]).vocab.split(",") == list(SAMPLE_SCENE_CLASSES)
    assert {"sky", "grass", "tree", "water", "mountain"} <= set(SAMPLE_SCENE_CLASSES)
    assert "aeroplane" not in SAMPLE_SCENE_CLASSES
    scene = np.asarray(draw_sample_scene()).astype(int)
    height, width = scene.shape[:2]
    # spot checks that the named things are drawn where they should be
    assert scene[5, 5, 2] > scene[5, 5, 0] + 80                                   # sky: blue at the top
    lake = scene[int(height * 0.865), int(width * 0.83)]
    assert lake[2] > lake[1] > lake[0]                                            # water: blue in the grass
    grass = scene[int(height * 0.9), int(width * 0.05)]
    assert grass[1] > grass[0] + 50 and grass[1] > grass[2] + 50                  # grass: green


def test_random_weights_banner_explains_itself_and_is_readable():
    import numpy as np

    from sed_fast import visualize
    from sed_fast.data.sample_scene import SAMPLE_SCENE_CLASSES, draw_sample_scene
    from sed_fast.video.overlay import render_frame

    scene = draw_sample_scene()
    labels = np.random.default_rng(0).integers(0, len(SAMPLE_SCENE_CLASSES), (scene.height, scene.width))
    plain = visualize.render_overlay(scene, labels, list(SAMPLE_SCENE_CLASSES))
    marked = visualize.render_overlay(scene, labels, list(SAMPLE_SCENE_CLASSES), banner=True)
    banner_height = marked.height - plain.height
    strip = marked.crop((0, 0, marked.width, banner_height))
    # the demo's overlay is wide enough for the full text: what the colours are, what a real
    # checkpoint shows and where the released weights are linked, on three lines
    full = visualize.RANDOM_WEIGHTS_BANNER[0]
    assert "noise" in full and "released weights" in full and "github.com/xb534/SED" in full
    rows_with_text = (np.asarray(strip).astype(int).sum(-1) > 600).any(axis=1)
    lines = int(rows_with_text[0]) + int((rows_with_text[1:] & ~rows_with_text[:-1]).sum())
    assert lines == 3, lines
    background, text = _banner_colours(strip)
    assert contrast_ratio(background, text) >= 4.5, (background, text)
    # a video frame gets one line, as readable
    frame = render_frame(np.asarray(scene), labels, list(SAMPLE_SCENE_CLASSES), banner=True)
    assert (frame[:3] == visualize.BANNER_BACKGROUND).all(axis=-1).mean() > 0.9
    assert contrast_ratio(*_banner_colours(visualize.Image.fromarray(frame[:20]))) >= 4.5
