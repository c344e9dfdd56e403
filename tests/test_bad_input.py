"""Bad input, round 2: paths that are not regular files, huge images, wide greyscale, several frames,
file names that start with '-' (``sed-fast segment``, ``sed-fast eval``'s reader, the image reader)."""
import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import PIL
from PIL import Image

from sed_fast import cli
from sed_fast.inputs.image_files import ImageTooLargeError, InputFileError, check_regular_file, read_rgb

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--vocab", "cat,dog,grass", "--random-weights", "--resolution", "64", "--impl", "reference", "--device",
        "cpu", "--quiet"]
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")


def run_main(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, err.getvalue()


def _image(path, h=40, w=56, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _png_header_only(path, width, height):
    """A PNG that claims width x height (8-bit grey) with a tiny, truncated IDAT: enough for Image.open."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


# -- 1. not a regular file ----------------------------------------------------------------------
@needs_fifo
def test_fifo_is_refused_up_front_without_hanging(tmp_path):
    fifo = tmp_path / "some.png"
    os.mkfifo(fifo)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "sed_fast", "segment", str(fifo), *ARGS, "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr
    assert "named pipe (FIFO)" in done.stderr and str(fifo) in done.stderr and "Traceback" not in done.stderr
    assert "built SED" not in done.stderr and not (tmp_path / "o").exists()  # before the model, before --out


def test_link_loop_and_dangling_link_are_named(tmp_path, fake_build):
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    (tmp_path / "gone.png").symlink_to(tmp_path / "nothing.png")
    code, err = run_main(["segment", tmp_path / "a.png", *ARGS, "--out", tmp_path / "o"])
    assert code == 2 and "loop of symbolic links" in err and "a.png" in err
    code, err = run_main(["segment", tmp_path / "gone.png", *ARGS, "--out", tmp_path / "o"])
    assert code == 2 and "symbolic link to" in err and "nothing.png" in err and "does not exist" in err
    assert fake_build == []


@needs_fifo
def test_fifo_in_a_folder_is_skipped_with_a_warning(tmp_path, fake_build):
    folder = tmp_path / "in"
    folder.mkdir()
    _image(folder / "good.png")
    os.mkfifo(folder / "pipe.png")
    code, err = run_main(["segment", folder, *ARGS, "--out", tmp_path / "o"])
    assert code == 0, err
    assert "skipping" in err and "pipe.png" in err and "FIFO" in err
    assert [Path(r["input"]).name for r in json.loads((tmp_path / "o" / "summary.json").read_text())["images"]] \
        == ["good.png"]


@needs_fifo
def test_the_reader_refuses_special_files(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    for path, words in ((tmp_path / "pipe.png", "FIFO"), (Path(os.devnull), "character device"),
                        (tmp_path, "folder")):
        with pytest.raises(InputFileError, match=words):
            read_rgb(path)  # opened non-blocking: a FIFO never blocks
        with pytest.raises(InputFileError, match=words):
            check_regular_file(path)
    with pytest.raises(FileNotFoundError):
        check_regular_file(tmp_path / "missing.png")
    assert check_regular_file(_image(tmp_path / "ok.png")).st_size > 0


@needs_fifo
def test_eval_refuses_special_files_up_front(tmp_path):
    from sed_fast.evaluation.datasets import DatasetError, custom_dataset, read_image, read_label

    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    _image(images / "a.png")
    Image.fromarray(np.zeros((40, 56), np.uint8)).save(labels / "a.png")
    os.mkfifo(images / "b.png")
    with pytest.raises(DatasetError, match=r"b\.png is a named pipe"):
        custom_dataset(images, labels, ["cat", "dog"], ignore_label=255)
    os.unlink(images / "b.png")
    (labels / "b.png").symlink_to(labels / "b.png")
    with pytest.raises(DatasetError, match="loop of symbolic links"):
        custom_dataset(images, labels, ["cat", "dog"], ignore_label=255)
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(InputFileError, match="FIFO"):
        read_image(tmp_path / "pipe.png")
    with pytest.raises(InputFileError, match="label map .*FIFO"):
        read_label(tmp_path / "pipe.png")


# -- 2. huge images -----------------------------------------------------------------------------
def test_pixel_limit_is_ours_not_pillows_warning(tmp_path, fake_build, monkeypatch):
    big = _png_header_only(tmp_path / "bomb.png", 20000, 10000)  # 200 MP: over Pillow's default limit
    small = _image(tmp_path / "small.png")
    monkeypatch.delenv("SED_FAST_MAX_PIXELS", raising=False)
    code, err = run_main(["segment", big, small, *ARGS, "--out", tmp_path / "o"])
    assert code == 1
    assert "20000x10000" in err and "--max-pixels" in err and "SED_FAST_MAX_PIXELS" in err
    assert "DecompressionBomb" not in err and "Traceback" not in err
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert [r["status"] for r in summary["images"]] == ["error", "ok"]
    code, err = run_main(["segment", small, *ARGS, "--max-pixels", "1000", "--out", tmp_path / "o2"])
    assert code == 1 and "over the limit of 1000 pixels" in err
    monkeypatch.setenv("SED_FAST_MAX_PIXELS", "2000")
    code, err = run_main(["segment", small, *ARGS, "--out", tmp_path / "o3"])
    assert code == 1 and "over the limit of 2000 pixels" in err
    code, err = run_main(["segment", small, *ARGS, "--max-pixels", "0", "--out", tmp_path / "o4"])
    assert code == 0, err  # the flag wins; 0 is no limit
    code, err = run_main(["segment", small, *ARGS, "--max-pixels", "-5", "--out", tmp_path / "o5"])
    assert code == 2 and "--max-pixels" in err
    with pytest.raises(ImageTooLargeError):
        read_rgb(big)


_PEAK = """
import resource, sys
from sed_fast import cli
from sed_fast.toolkit import options

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

build = options.build_model
after_build = {}

def measured_build(*args, **kwargs):
    built = build(*args, **kwargs)
    try:  # reset the peak to the current RSS: what follows is measured from the built model on
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        after_build["kb"] = status("VmRSS")
    except OSError:
        after_build["kb"] = 0  # no reset: peaks are compared with the baseline run's as they are
    return built

options.build_model = measured_build
code = cli.main(sys.argv[1:])
print("PEAK_KB", status("VmHWM") - after_build["kb"], "CODE", code)
"""


def _peak_kb(tmp_path, image, name):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _PEAK, "segment", str(image), *ARGS, "--no-text-cache",
                           "--out", str(tmp_path / name)], capture_output=True, text=True, timeout=900, env=env)
    words = done.stdout.split()
    assert "PEAK_KB" in words and words[words.index("CODE") + 1] == "0", done.stdout + done.stderr
    return int(words[words.index("PEAK_KB") + 1]) * 1024


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in kilobytes is Linux's")
def test_peak_memory_per_pixel_of_a_large_image(tmp_path):
    """A large one-colour PNG costs at most 12 bytes per pixel above a small image's run (the model's
    own memory): decode, resize, labels, overlay and outputs without full-size float copies."""
    height, width = 3000, 4200  # 12.6 MP (large enough to dwarf noise, small enough for a CI machine)
    large = tmp_path / "large.png"
    Image.new("RGB", (width, height), (40, 160, 90)).save(large, compress_level=1)
    small = _image(tmp_path / "small.png", 64, 64)
    baseline = _peak_kb(tmp_path, small, "o_small")
    peak = _peak_kb(tmp_path, large, "o_large")
    per_pixel = (peak - baseline) / (height * width)
    print(f"peak {peak / 2**20:.0f} MiB, baseline {baseline / 2**20:.0f} MiB: {per_pixel:.2f} bytes per pixel")
    # 8.5 measured with Pillow 12.3 and 8.8 with Pillow 13; the peak is the label map being made (the
    # running maximum, one class plane, the labels) or the decode (Pillow's copy and the array).
    bound = 12
    assert per_pixel <= bound, (f"{per_pixel:.1f} bytes per input pixel above the model's own memory "
                                f"(Pillow {PIL.__version__})")
    with Image.open(tmp_path / "o_large" / "large_labels.png") as labels:
        assert labels.size == (width, height) and labels.mode in ("L", "P")


# -- 3. wide greyscale --------------------------------------------------------------------------
def test_16_bit_grey_gradient_is_refused_not_clipped(tmp_path, fake_build):
    gradient = (np.arange(64 * 256).reshape(64, 256) * 4).astype(np.uint16)  # 0..65532
    Image.fromarray(gradient).save(tmp_path / "grad16.png")
    with Image.open(tmp_path / "grad16.png") as image:
        assert image.mode == "I;16"
    code, err = run_main(["segment", tmp_path / "grad16.png", *ARGS, "--out", tmp_path / "o"])
    assert code == 1
    assert "16-bit greyscale" in err and "0..65532" in err and "clips" in err and "8 bits" in err
    record = json.loads((tmp_path / "o" / "summary.json").read_text())["images"][0]
    assert record["status"] == "error" and "clips" in record["error"]


def test_wide_grey_within_0_255_reads_as_detectron2(tmp_path):
    grey = (np.arange(40 * 64).reshape(40, 64) % 256).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "g8.png")
    pixels, info = read_rgb(tmp_path / "g16.png")
    assert info.mode == "I;16" and pixels.dtype == np.uint8 and pixels.flags.writeable
    assert np.array_equal(pixels, read_rgb(tmp_path / "g8.png")[0])
    assert np.array_equal(pixels[..., 0], grey)
    Image.fromarray(np.full((40, 64), 300.5, np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(InputFileError, match="32-bit float greyscale .*F"):
        read_rgb(tmp_path / "f.tif")
    Image.fromarray(np.full((40, 64), -3, np.int32)).save(tmp_path / "i.tif")
    with pytest.raises(InputFileError, match="32-bit integer"):
        read_rgb(tmp_path / "i.tif")


def test_band_wise_reading_equals_pillow_convert(tmp_path, monkeypatch):
    import sed_fast.inputs.image_files as image_files

    monkeypatch.setattr(image_files, "_BAND_PIXELS", 100)  # many bands
    rng = np.random.default_rng(1)
    paletted = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).convert("P")
    rgba = rng.integers(0, 256, (37, 53, 4), dtype=np.uint8)
    for mode, image in (("P", paletted), ("L", Image.fromarray(rng.integers(0, 256, (37, 53), dtype=np.uint8))),
                        ("RGBA", Image.fromarray(rgba))):
        image.save(tmp_path / f"{mode}.png")
        with Image.open(tmp_path / f"{mode}.png") as expected:
            if mode == "RGBA":  # transparency is composited on white (tests/test_transparency.py)
                white = Image.new("RGBA", expected.size, (255, 255, 255, 255))
                expected = Image.alpha_composite(white, expected.convert("RGBA"))
            assert np.array_equal(read_rgb(tmp_path / f"{mode}.png")[0], np.asarray(expected.convert("RGB")))


# -- 4. several frames --------------------------------------------------------------------------
# An animated GIF is a video now: tests/video/test_video_gif.py.
@pytest.mark.parametrize("name, count", [("pages.tif", 4)])
def test_first_frame_of_many_is_said(tmp_path, fake_build, name, count):
    frames = [Image.fromarray(np.full((40, 56, 3), 60 * i, np.uint8)) for i in range(count)]
    frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:])
    code, err = run_main(["segment", tmp_path / name, *ARGS, "--out", tmp_path / "o"])
    assert code == 0, err
    assert f"frame 0 of {count}" in err
    record = json.loads((tmp_path / "o" / "summary.json").read_text())["images"][0]
    assert record["frame"] == 0 and record["num_frames"] == count and f"frame 0 of {count}" in record["note"]
    _image(tmp_path / "single.png")
    code, err = run_main(["segment", tmp_path / "single.png", *ARGS, "--out", tmp_path / "o1"])
    record = json.loads((tmp_path / "o1" / "summary.json").read_text())["images"][0]
    assert "frame" not in err and "num_frames" not in record


# -- 6. a file name that starts with '-' --------------------------------------------------------
def test_dash_file_name_gets_a_hint(tmp_path, fake_build, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _image(tmp_path / "-dash.png")
    code, err = run_main(["segment", "-dash.png", *ARGS, "--out", "o"])
    assert code == 2 and "./-dash.png" in err and " -- " in err
    code, err = run_main(["segment", *ARGS, "--out", "o", "--", "-dash.png"])
    assert code == 0, err
    code, err = run_main(["segment", "./-dash.png", *ARGS, "--out", "o2"])
    assert code == 0, err


@needs_fifo
def test_video_source_refuses_a_fifo(tmp_path):
    pytest.importorskip("av")
    from sed_fast.video.io import SourceError, open_source

    os.mkfifo(tmp_path / "clip.mp4")
    with pytest.raises(SourceError, match=r"clip\.mp4 is a named pipe"):
        open_source(str(tmp_path / "clip.mp4"))
    (tmp_path / "loop.mp4").symlink_to(tmp_path / "loop.mp4")
    with pytest.raises(SourceError, match="loop of symbolic links"):
        open_source(str(tmp_path / "loop.mp4"))
