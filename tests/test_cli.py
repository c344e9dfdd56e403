"""The ``sed-fast`` command line and the visualisation helpers (CPU, random weights, tiny inputs)."""
import contextlib
import io
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sed_fast import cli
from sed_fast.segment import cli as segment_cli
from fake_model import FakeModel as _FakeModel
from sed_fast.visualize import (BANNER_BACKGROUND, class_areas, colorize, draw_legend, label_image, overlay, palette,
                                render_overlay)

VOCAB = "cat,dog,grass"
NAMES = ["cat", "dog", "grass"]
FAST_ARGS = ["--vocab", VOCAB, "--random-weights", "--resolution", "64", "--variant", "b",
             "--impl", "reference", "--device", "cpu", "--quiet"]
H, W = 40, 56


def run_main(argv):
    """main(argv) in-process: (exit code, stderr text)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, err.getvalue()


def random_rgb(h=H, w=W, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def load_png(path):
    with Image.open(path) as image:
        image.load()
        return image


# -- the main scenario, run once ---------------------------------------------------------------
@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_good")
    folder = root / "images"
    folder.mkdir()
    Image.fromarray(random_rgb(seed=1)).save(folder / "a.png")
    Image.fromarray(random_rgb(seed=2)).convert("RGBA").save(folder / "rgba.PNG")  # upper-case extension
    Image.fromarray(random_rgb(seed=3)).convert("L").save(folder / "gray.jpg")
    (folder / "notes.txt").write_text("not an image")  # ignored in a folder
    other = root / "other"
    other.mkdir()
    Image.fromarray(random_rgb(48, 64, seed=4)).save(other / "a.png")  # same stem as images/a.png
    out = root / "out"
    code, err = run_main(["segment", folder, other / "a.png", *FAST_ARGS, "--save-scores", "--out", out])
    assert (out / "summary.json").is_file(), f"exit code {code}, stderr:\n{err}"
    summary = json.loads((out / "summary.json").read_text())
    return types.SimpleNamespace(code=code, err=err, out=out, summary=summary, folder=folder, other=other)


def test_good_run_succeeds_and_says_random_weights(good_run):
    assert good_run.code == 0, good_run.err
    assert "RANDOM WEIGHTS" in good_run.err
    assert "Traceback" not in good_run.err
    assert good_run.summary["random_weights"] is True


def test_summary_content(good_run):
    s = good_run.summary
    assert s["vocabulary"]["class_names"] == NAMES
    assert s["vocabulary"]["num_classes"] == 3
    assert s["variant"] == "b" and s["impl"] == "reference" and s["dtype"] == "float32"
    assert s["cer_topk"] is None and s["checkpoint"] is None and s["clip_resolution"] == 64
    assert s["num_images"] == 4 and s["num_ok"] == 4 and s["num_failed"] == 0
    inputs = [Path(r["input"]).name for r in s["images"]]
    assert inputs == ["a.png", "gray.jpg", "rgba.PNG", "a.png"]  # folder sorted, then the file
    for record in s["images"]:
        assert record["status"] == "ok"
        shares = [c["share"] for c in record["classes"]]
        assert shares == sorted(shares, reverse=True)
        assert abs(sum(shares) - 1.0) < 1e-4
        assert all(0 <= c["index"] < 3 and c["name"] == NAMES[c["index"]] for c in record["classes"])


def test_name_collision_is_disambiguated(good_run):
    records = good_run.summary["images"]
    stems = [r["outputs"]["labels"] for r in records]
    assert len(set(stems)) == len(stems)
    for record in records:
        for name in record["outputs"].values():
            assert (good_run.out / name).is_file()
    # the two a.png have different sizes: each label map matches its own input
    first, last = records[0], records[-1]
    assert load_png(good_run.out / first["outputs"]["labels"]).size == (W, H)
    assert load_png(good_run.out / last["outputs"]["labels"]).size == (64, 48)


def test_label_maps(good_run):
    for record in good_run.summary["images"]:
        with Image.open(record["input"]) as source:
            size = source.size
        labels = load_png(good_run.out / record["outputs"]["labels"])
        assert labels.mode == "P" and labels.size == size  # indices as pixel values, shown in class colours
        assert labels.getpalette()[:9] == palette(3).ravel().tolist()
        values = np.array(labels)
        assert values.max() < 3
        present = {c["index"] for c in record["classes"]}
        assert set(np.unique(values).tolist()) == present
        assert (record["height"], record["width"]) == (size[1], size[0])


def test_scores_npy(good_run):
    for record in good_run.summary["images"]:
        scores = np.load(good_run.out / record["outputs"]["scores"])
        assert scores.dtype == np.float16
        assert scores.shape == (3, record["height"], record["width"])
        assert scores.min() >= 0 and scores.max() <= 1
        labels = np.array(load_png(good_run.out / record["outputs"]["labels"]))
        # the labelled class has the top score (float16 rounding is monotonic; it may only add ties)
        assert np.array_equal(np.take_along_axis(scores, labels[None].astype(np.int64), 0)[0], scores.max(0))


def test_overlay_has_legend_and_banner(good_run):
    colours = palette(3)
    for record in good_run.summary["images"]:
        image = load_png(good_run.out / record["outputs"]["overlay"])
        assert image.mode == "RGB"
        assert image.width > record["width"] and image.height >= record["height"]
        pixels = np.array(image)
        legend = pixels[:, record["width"]:].reshape(-1, 3)
        legend_colours = {tuple(p) for p in np.unique(legend, axis=0).tolist()}
        for c in record["classes"]:  # a swatch of each class present, in its exact colour
            assert tuple(colours[c["index"]].tolist()) in legend_colours
        top = pixels[:3].reshape(-1, 3)  # the dark red random-weights banner
        assert (np.all(top == BANNER_BACKGROUND, axis=1)).mean() > 0.5


# -- failures ----------------------------------------------------------------------------------
def test_bad_images_fail_alone(tmp_path, monkeypatch):
    import sed_fast.api

    # The real model runs in good_run; here only the per-image error handling is under test (the
    # fake applies the model's own input checks, which refuse images under 32 px).
    monkeypatch.setattr(sed_fast.api, "build_sed", lambda variant, **kwargs: _FakeModel())
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(random_rgb(seed=5)).save(folder / "good.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    Image.fromarray(random_rgb(20, 24, seed=6)).save(folder / "tiny.png")  # under 32 px
    out = tmp_path / "out"
    code, err = run_main(["segment", str(folder / "*.png"), tmp_path / "missing.jpg", *FAST_ARGS, "--out", out])
    assert code == 1, err
    assert "Traceback" not in err
    assert "missing.jpg" in err and "corrupt.png" in err and "tiny.png" in err
    summary = json.loads((out / "summary.json").read_text())
    status = {Path(r["input"]).name: r for r in summary["images"]}
    assert set(status) == {"corrupt.png", "good.png", "tiny.png", "missing.jpg"}
    assert status["good.png"]["status"] == "ok"
    assert (out / "good_labels.png").is_file() and (out / "good_overlay.png").is_file()
    assert not (out / "good_scores.npy").exists()
    for name in ("corrupt.png", "tiny.png", "missing.jpg"):
        assert status[name]["status"] == "error" and status[name]["error"]
    assert "not found" in status["missing.jpg"]["error"]
    assert "32" in status["tiny.png"]["error"]
    assert summary["num_failed"] == 3 and summary["random_weights"] is True


@pytest.fixture
def one_image(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(random_rgb()).save(path)
    return path


def test_no_checkpoint_needs_random_weights(one_image, tmp_path):
    code, err = run_main(["segment", one_image, "--vocab", VOCAB, "--out", tmp_path / "o", "--device", "cpu"])
    assert code == 2
    assert "--checkpoint" in err and "--random-weights" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_missing_checkpoint_file(one_image, tmp_path):
    code, err = run_main(["segment", one_image, "--vocab", VOCAB, "--checkpoint", tmp_path / "nope.pth",
                          "--out", tmp_path / "o", "--device", "cpu"])
    assert code == 2 and "not found" in err and "Traceback" not in err


def test_corrupt_checkpoint(one_image, tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a checkpoint")
    code, err = run_main(["segment", one_image, "--vocab", VOCAB, "--checkpoint", bad, "--resolution", "64",
                          "--out", tmp_path / "o", "--device", "cpu", "--impl", "reference"])
    assert code == 2 and "bad.pth" in err and "Traceback" not in err


def test_empty_vocabulary_file(one_image, tmp_path):
    vocab = tmp_path / "empty.txt"
    vocab.write_text("")
    code, err = run_main(["segment", one_image, "--vocab", vocab, "--random-weights", "--out", tmp_path / "o",
                          "--device", "cpu"])
    assert code == 2 and "vocab" in err and "Traceback" not in err


@pytest.mark.parametrize("extra, message", [
    (["--variant", "x"], "variant"),
    (["--resolution", "50"], "multiple of 32"),
    (["--cer-topk", "0"], "cer-topk"),
])
def test_bad_options(one_image, tmp_path, extra, message):
    code, err = run_main(["segment", one_image, "--vocab", VOCAB, "--random-weights", "--out", tmp_path / "o",
                          "--device", "cpu", *extra])
    assert code == 2 and message in err and "Traceback" not in err


def test_no_images(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run_main(["segment", empty, tmp_path / "nothing.png", str(tmp_path / "*.jpg"), "--vocab", VOCAB,
                          "--random-weights", "--out", tmp_path / "o", "--device", "cpu"])
    assert code == 2 and "no images" in err and "Traceback" not in err


def test_collect_images(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("b.JPG", "a.png", "c.txt", "e.tiff"):
        (tmp_path / "d" / name).write_bytes(b"x")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.png").write_bytes(b"x")
    items = segment_cli.collect_images([str(tmp_path / "d"), str(tmp_path / "*" / "a.png"),
                                        str(tmp_path / "d" / "a.png")], quiet=True)
    assert [i.path.name for i in items] == ["a.png", "b.JPG", "e.tiff", "a.png"]  # no repeat of d/a.png
    assert all(i.missing is None for i in items)
    stems = [i.stem for i in items]
    assert len({s.lower() for s in stems}) == 4 and stems[1:3] == ["b", "e"]


def test_debug_shows_traceback(one_image, tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    code, err = run_main(["segment", one_image, "--vocab", VOCAB, "--checkpoint", bad, "--out", tmp_path / "o",
                          "--device", "cpu", "--debug"])
    assert code == 2 and "Traceback" in err


def test_fast_impl_falls_back_to_reference(one_image, tmp_path, monkeypatch):
    import sed_fast.api

    built = []

    def fake_build(variant, *, impl, **kwargs):
        built.append(impl)
        if impl == "fast":
            raise ImportError("no module named sed_fast.models.fast")
        return _FakeModel()

    monkeypatch.setattr(sed_fast.api, "build_sed", fake_build)
    argv = ["segment", one_image, "--vocab", VOCAB, "--random-weights", "--device", "cpu", "--quiet"]
    code, err = run_main(argv + ["--out", tmp_path / "o"])  # default impl: fast, with a fallback
    assert code == 0, err
    assert built == ["fast", "reference"] and "fast implementation cannot be built" in err
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["impl"] == "reference"
    built.clear()
    code, err = run_main(argv + ["--impl", "fast", "--out", tmp_path / "o2"])  # asked for: no substitute
    assert code == 2 and built == ["fast"] and "--impl reference" in err


def test_many_classes_give_16_bit_labels(tmp_path, monkeypatch):
    import sed_fast.api

    monkeypatch.setattr(sed_fast.api, "build_sed", lambda variant, **kwargs: _FakeModel())
    path = tmp_path / "img.png"
    Image.fromarray(random_rgb(64, 64)).save(path)
    vocab = tmp_path / "classes.txt"
    vocab.write_text("\n".join(f"class{i}" for i in range(300)))
    code, err = run_main(["segment", path, "--vocab", vocab, "--random-weights", "--device", "cpu", "--quiet",
                          "--impl", "reference", "--out", tmp_path / "o"])
    assert code == 0, err
    labels = load_png(tmp_path / "o" / "img_labels.png")
    assert labels.mode.startswith("I") and labels.size == (64, 64)
    values = np.array(labels)
    assert values.max() < 300 and values.max() > 255  # 4096 pixels over 300 classes: some index > 255


# -- other subcommands -------------------------------------------------------------------------
def test_external_subcommands_dispatch(monkeypatch):
    seen = {}
    fake = types.ModuleType("sed_fast.bench.e2e")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "sed_fast.bench.e2e", fake)
    code, _ = run_main(["bench", "--size", "768", "--help"])
    assert code == 0 and seen["argv"] == ["--size", "768", "--help"]
    monkeypatch.setitem(cli.COMMANDS, "profile", ("benchmarks.no_such_module_xyz", ""))
    code, err = run_main(["profile", "--x"])
    assert code == 2 and "benchmarks.no_such_module_xyz" in err and "Traceback" not in err


def test_python_m_help():
    result = subprocess.run([sys.executable, "-m", "sed_fast", "--help"], capture_output=True, text=True,
                            timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert "segment" in result.stdout and "bench" in result.stdout and "profile" in result.stdout


# -- visualisation helpers ---------------------------------------------------------------------
def test_palette_is_distinct_and_stable():
    colours = palette(3000)
    assert colours.shape == (3000, 3) and colours.dtype == np.uint8
    assert len({tuple(c) for c in colours.tolist()}) == 3000
    assert (colours.sum(1) > 0).all()  # no black class
    assert np.array_equal(palette(10), colours[:10])


def test_label_colorize_overlay():
    scores = np.zeros((3, 4, 5), dtype=np.float32)
    scores[2, :, :2] = 1
    scores[1, :, 2:] = 1
    labels = label_image(scores)
    assert labels.shape == (4, 5) and set(np.unique(labels)) == {1, 2}
    assert class_areas(labels, 3).tolist() == [0, 12, 8]
    mask = np.array(colorize(labels))
    assert (mask[0, 0] == palette(3)[2]).all()
    blended = np.array(overlay(np.zeros((4, 5, 3), np.uint8), labels, alpha=1.0))
    assert np.array_equal(blended, mask)


def test_legend_more_rows():
    entries = [(f"class {i}", tuple(palette(30)[i].tolist()), 1 / 30) for i in range(30)]
    small = draw_legend(entries, max_items=5, font_size=12)
    full = draw_legend(entries, max_items=40, font_size=12)
    assert small.height < full.height
    colours = {tuple(c) for c in np.array(small).reshape(-1, 3).tolist()}
    assert tuple(palette(30)[3].tolist()) in colours and tuple(palette(30)[4].tolist()) not in colours


def test_render_overlay_display_names():
    labels = np.zeros((40, 56), dtype=np.int64)
    labels[:, 30:] = 1
    image = render_overlay(random_rgb(), labels, ["wall, brick wall", "sky"], banner=False)
    assert image.height >= 40 and image.width > 56


# -- markers, summary life cycle, output names -------------------------------------------------
def test_every_png_of_a_random_weights_run_is_marked(good_run):
    from sed_fast.visualize import PNG_MARKER_KEY, RANDOM_WEIGHTS_MARKER

    pngs = sorted(good_run.out.glob("*.png"))
    assert len(pngs) == 8
    for path in pngs:
        with Image.open(path) as image:
            image.load()
            assert image.text.get(PNG_MARKER_KEY) == RANDOM_WEIGHTS_MARKER, path.name
            assert "RANDOM WEIGHTS" in image.text.get("Comment", "")


def test_summary_says_complete_and_which_run(good_run):
    s = good_run.summary
    assert s["status"] == "complete" and s["exit_code"] == 0
    assert len(s["run_id"]) == 32 and s["started_at"] <= s["finished_at"]
    assert s["impl"] == "reference" and s["device"] == "cpu"


def _fake_build(monkeypatch, model_factory=None):
    import sed_fast.api

    calls = []

    def build(variant, **kwargs):
        calls.append(variant)
        return (model_factory or _FakeModel)()

    monkeypatch.setattr(sed_fast.api, "build_sed", build)
    return calls


def test_reused_out_gets_a_new_summary_even_when_interrupted(tmp_path, monkeypatch, one_image):
    _fake_build(monkeypatch)
    out = tmp_path / "o"
    code, err = run_main(["segment", one_image, *FAST_ARGS, "--out", out])
    assert code == 0, err
    first = json.loads((out / "summary.json").read_text())

    class Interrupting(_FakeModel):
        def set_vocabulary(self, names, progress=None):
            raise KeyboardInterrupt

    _fake_build(monkeypatch, Interrupting)
    code, err = run_main(["segment", one_image, *FAST_ARGS, "--out", out])
    assert code == 130 and "interrupted" in err
    second = json.loads((out / "summary.json").read_text())
    assert second["run_id"] != first["run_id"] and second["started_at"] >= first["started_at"]
    assert second["status"] == "interrupted" and second["exit_code"] == 130 and second["signal"] == "SIGINT"
    assert second["images"] == [] and second["num_not_processed"] == 1


def test_fresh_out_interrupted_before_any_image_has_a_summary(tmp_path, monkeypatch, one_image):
    import sed_fast.api

    def build(variant, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sed_fast.api, "build_sed", build)
    code, err = run_main(["segment", one_image, *FAST_ARGS, "--out", tmp_path / "fresh"])
    assert code == 130
    summary = json.loads((tmp_path / "fresh" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["num_images"] == 0


def test_failed_run_summary_says_failed(tmp_path, monkeypatch, one_image):
    import sed_fast.api

    def build(variant, **kwargs):
        raise MemoryError("no memory left")

    monkeypatch.setattr(sed_fast.api, "build_sed", build)
    code, err = run_main(["segment", one_image, *FAST_ARGS, "--out", tmp_path / "o"])
    assert code == 1 and "MemoryError" in err
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["exit_code"] == 1 and "no memory left" in summary["error"]


def test_long_input_names_get_short_unique_output_names(tmp_path, monkeypatch):
    _fake_build(monkeypatch)
    folder = tmp_path / "in"
    folder.mkdir()
    stems = ["x" * 240 + "a", "x" * 240 + "b", "é" * 120]  # 241 and 240 characters (240 bytes of é: 2 each)
    for i, stem in enumerate(stems):
        Image.fromarray(random_rgb(seed=i)).save(folder / f"{stem}.png")
    out = tmp_path / "o"
    code, err = run_main(["segment", folder, *FAST_ARGS, "--save-scores", "--out", out])
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    names = [name for r in summary["images"] for name in r["outputs"].values()]
    assert len(names) == 9 and len(set(names)) == 9
    for name in names:
        assert len(name.encode()) <= 130 and (out / name).is_file()
    labels = [r["outputs"]["labels"] for r in summary["images"]]
    assert labels[0].startswith("x" * 50) and labels[2].startswith("é" * 10)


def test_bad_environment_variable_is_a_usage_error(tmp_path, monkeypatch, one_image):
    calls = _fake_build(monkeypatch)
    for name, value in (("SED_FAST_TRUST_CHECKPOINTS", "nope"), ("SED_FAST_TEXT_CACHE", "sometimes"),
                        ("SED_FAST_TEXT_CACHE_MB", "big")):
        with monkeypatch.context() as env:
            env.setenv(name, value)
            code, err = run_main(["segment", one_image, *FAST_ARGS, "--out", tmp_path / "o"])
        assert code == 2 and name in err and "Traceback" not in err
    assert calls == [] and not (tmp_path / "o").exists()


def test_vocabulary_refused_by_the_text_encoder_is_a_usage_error(tmp_path, monkeypatch, one_image):
    from sed_fast.data.text import check_tokenized_duplicates

    class Checking(_FakeModel):
        def set_vocabulary(self, names, progress=None):  # the model's check, without its text tower
            from sed_fast.models.encoder import create_tokenizer, variant_spec
            check_tokenized_duplicates(create_tokenizer(variant_spec("b")), names, ["a photo of a {}."])
            return super().set_vocabulary(names, progress)

    import sed_fast.api
    monkeypatch.setattr(sed_fast.api, "build_sed", lambda variant, **kwargs: Checking())
    argv = ["segment", one_image, "--vocab", "cat,dog,Cat", "--random-weights", "--device", "cpu", "--quiet",
            "--out", tmp_path / "o"]
    code, err = run_main(argv)
    assert code == 2 and "tokenizer makes identical" in err and "'Cat' (index 2)" in err and "Traceback" not in err
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["exit_code"] == 2


def test_summary_is_rewritten_after_each_image(tmp_path, monkeypatch):
    out = tmp_path / "o"
    seen = []

    class Watching(_FakeModel):
        def __call__(self, images):
            summary = json.loads((out / "summary.json").read_text())
            seen.append((summary["status"], summary["num_images"], summary["impl"]))
            return super().__call__(images)

    import sed_fast.api
    monkeypatch.setattr(sed_fast.api, "build_sed", lambda variant, **kwargs: Watching())
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(random_rgb(seed=i)).save(folder / f"{i}.png")
    code, err = run_main(["segment", folder, *FAST_ARGS, "--out", out])
    assert code == 0, err
    assert seen == [("running", 0, "reference"), ("running", 1, "reference"), ("running", 2, "reference")]
    assert json.loads((out / "summary.json").read_text())["num_images"] == 3


def test_batches_of_images_of_different_sizes_equal_one_at_a_time(tmp_path):
    """--batch-size N runs the list API (one forward for images of any sizes); the labels equal
    those of one image per forward, and --save-scores gives the same labels as predict_labels."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i, (h, w) in enumerate([(40, 52), (64, 33), (45, 45)]):
        Image.fromarray(random_rgb(h, w, seed=10 + i)).save(folder / f"im{i}.png")
    outs = {}
    for name, extra in (("one", []), ("batched", ["--batch-size", "3"]), ("scores", ["--save-scores"])):
        out = tmp_path / name
        code, err = run_main(["segment", folder, *FAST_ARGS, "--out", out, *extra])
        assert code == 0, err
        outs[name] = {i: np.array(load_png(out / f"im{i}_labels.png")) for i in range(3)}
    for i in range(3):
        # a batch of 3 rounds differently from a batch of 1 (random weights: many near-ties)
        assert (outs["one"][i] == outs["batched"][i]).mean() >= 0.99
        assert np.array_equal(outs["one"][i], outs["scores"][i])
    code, err = run_main(["segment", folder, *FAST_ARGS, "--out", tmp_path / "bad", "--batch-size", "0"])
    assert code == 2 and "--batch-size" in err
