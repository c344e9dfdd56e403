"""The demo's request handling without a browser: parsing, caching, modes, bad input."""
import av
import numpy as np
import pytest
import torch
from PIL import Image
from video_clips import write_clip

import sed_fast.api
from sed_fast.serve import app as serve_app
from sed_fast.serve.app import CER, EXACT, InputProblem, Segmenter, parse_class_names

pytestmark = pytest.mark.filterwarnings("ignore::sed_fast.RandomWeightsWarning")


@pytest.fixture(scope="module")
def segmenter():
    model = sed_fast.api.build_sed("b", impl="fast", device="cpu", clip_resolution=64)
    return Segmenter(model, random_weights=True, max_megapixels=1.0, max_video_frames=5)


@pytest.fixture
def picture(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "p.png"
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


def test_parse_class_names():
    assert parse_class_names('cat, "person, individual", grass,') == ["cat", "person, individual", "grass"]
    assert parse_class_names('["sky", "bed "]') == ["sky", "bed "]
    for bad, said in [("", "No class names"), ("a,,b", "empty"), ('a, "b', "double quote"),
                      ("cat, cat", "duplicate"), ("[1]", "not a string")]:
        with pytest.raises(InputProblem, match=said):
            parse_class_names(bad)


def test_image_request_overlay_legend_table_and_one_text_encoding(segmenter, picture):
    names = "cat, \"person, individual\", grass"
    overlay, legend, rows, timing = segmenter.segment_image(str(picture), names, None, EXACT, 8)
    pixels = torch.from_numpy(np.asarray(Image.open(picture).convert("RGB")).copy()).permute(2, 0, 1)
    expected = segmenter.model.predict_labels([pixels])[0]
    shown = ["cat", "person", "grass"]
    present = [shown[i] for i in np.unique(expected.numpy())]
    assert sorted(row[0] for row in rows) == sorted(present)
    assert sum(row[2] for row in rows) == 48 * 64
    assert all(f'<span class="sed-legend-name">{name}</span>' in legend for name in present)
    assert overlay.size[0] > 64 and overlay.size[1] > 48  # the legend panel and the random-weights banner
    assert "Time by stage" in timing and "model" in timing and "exact decoding" in timing
    encodings = segmenter.text_encodings
    _, _, _, timing = segmenter.segment_image(str(picture), names, None, CER, 2)
    assert segmenter.text_encodings == encodings, "the same vocabulary is encoded once"
    assert "CER k=2" in timing and segmenter.model.cer_topk == 2
    segmenter.segment_image(str(picture), "dog", None, EXACT, 8)
    assert segmenter.text_encodings == encodings + 1 and segmenter.model.cer_topk is None


def test_dataset_vocabulary_wins_over_typed_names(segmenter):
    from sed_fast.data.vocabulary import load_vocabulary

    assert segmenter.class_names("cat, dog", "voc20") == load_vocabulary("voc20")
    assert segmenter.class_names("cat, dog", serve_app.TYPED) == ["cat", "dog"]
    with pytest.raises(InputProblem, match="Vocabulary 'nope'"):
        segmenter.class_names("", "nope")


@pytest.mark.parametrize("case", ["not an image", "no classes", "too many megapixels", "too small", "no file",
                                  "bad k"])
def test_bad_input_is_a_message(segmenter, picture, tmp_path, case):
    path, classes, mode, k, said = str(picture), "cat", EXACT, 8, ""
    if case == "not an image":
        path = tmp_path / "notes.png"
        path.write_text("hello")
        said = "is not an image"
    elif case == "no classes":
        classes, said = " ", "No class names"
    elif case == "too many megapixels":  # this segmenter takes 1 megapixel; the page default is 25
        path = tmp_path / "big.png"
        Image.new("RGB", (1500, 1000)).save(path)
        said = "1.5 megapixels"
    elif case == "too small":
        path = tmp_path / "small.png"
        Image.new("RGB", (20, 20)).save(path)
        said = "at least 32x32"
    elif case == "no file":
        path, said = None, "No image"
    else:
        mode, k, said = CER, 0, "k must be >= 1"
    with pytest.raises(InputProblem, match=said):
        segmenter.segment_image(str(path) if path else None, classes, None, mode, k)


def test_fifty_megapixel_default_limit(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("L", (8660, 5780)).save(path)  # 50 megapixels, a few kB on disk: refused from its header
    with pytest.raises(InputProblem, match="50.1 megapixels"):
        Segmenter(object(), random_weights=True).load_image(str(path))


def test_clip_request(segmenter, tmp_path):
    clip = write_clip(tmp_path / "c.mp4", frames=7)
    video, rows, timing = segmenter.segment_clip(str(clip), "cat, grass", None, EXACT, 8, out_dir=tmp_path / "o")
    with av.open(video) as container:
        assert len(list(container.decode(video=0))) == 5  # the app's limit here
    assert "stopped at the app's limit of 5 frames" in timing and rows
    with pytest.raises(InputProblem, match="no valid media"):
        bad = tmp_path / "bad.mp4"
        bad.write_text("x")
        segmenter.segment_clip(str(bad), "cat", None, EXACT, 8)


def test_build_app_has_the_random_weights_notice(segmenter):
    app = serve_app.build_app(segmenter)
    assert "RANDOM WEIGHTS" in str(app.config)


def test_serve_command_usage_errors(capsys):
    from sed_fast import cli

    assert cli.main(["serve", "--port", "70000"]) == cli.EXIT_USAGE
    assert "--port must be in 0..65535" in capsys.readouterr().err
    assert cli.main(["serve", "--checkpoint", "/no/such/model.pth"]) == cli.EXIT_USAGE
    assert "checkpoint file not found" in capsys.readouterr().err


def test_demo_ui_is_serve(capsys):
    from sed_fast import cli

    assert cli.main(["demo", "--ui", "--port", "70000"]) == cli.EXIT_USAGE
    assert "--port must be in 0..65535" in capsys.readouterr().err
