"""The server's bounds: hostile requests are refused before they touch the model, a request that
runs past the time limit is stopped where its work can stop, and the page's banner is readable."""
import re
from argparse import Namespace

import numpy as np
import pytest
from PIL import Image
from video_clips import write_clip

import sed_fast.api
from sed_fast.serve import app as serve_app
from sed_fast.serve.app import EXACT, TYPED, InputProblem, Segmenter
from sed_fast.serve.limits import Deadline, LinearTimes, Limits, TimeLimitExceeded

pytestmark = pytest.mark.filterwarnings("ignore::sed_fast.RandomWeightsWarning")


class UntouchableModel:
    """A model that fails the test if a request gets as far as using it."""

    def __getattr__(self, name):
        raise AssertionError(f"the request reached the model (model.{name}) instead of being refused first")


class SteppingClock:
    """A clock that advances ``step`` seconds each time it is read."""

    def __init__(self, step: float):
        self.step, self.now = step, 0.0

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@pytest.fixture(scope="module")
def model():
    return sed_fast.api.build_sed("b", impl="fast", device="cpu", clip_resolution=64)


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "p.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("typed, vocabulary, said", [
    ("x" * 10_000, TYPED, "Class name 1 ('xxxx"),
    (", ".join(f"class {i}" for i in range(5_000)), TYPED, "5,000 classes were asked for"),
    ("", "/etc/passwd", "Vocabulary '/etc/passwd' is not one of this server's vocabularies"),
    ("", "../sed_fast/data/vocabularies/ade150.json", "is not one of this server's vocabularies"),
    ("", "ADE150 ", "is not one of this server's vocabularies"),
    ("a, " * 400_000, TYPED, "characters long; this server takes at most"),
])
def test_hostile_requests_are_refused_before_the_model(picture, typed, vocabulary, said):
    segmenter = Segmenter(UntouchableModel(), random_weights=True)
    with pytest.raises(InputProblem, match=re.escape(said)):
        segmenter.segment_image(picture, typed, vocabulary, EXACT, 8)
    with pytest.raises(InputProblem, match=re.escape(said)):
        segmenter.segment_clip(picture, typed, vocabulary, EXACT, 8)


def test_refusals_name_the_option_that_raises_the_bound():
    limits = Limits(max_classes=3, max_name_chars=5)
    with pytest.raises(InputProblem, match="--max-classes"):
        limits.check_names(["a", "b", "c", "d"])
    with pytest.raises(InputProblem, match="--max-name-chars"):
        limits.check_names(["abcdef"])
    assert limits.check_names(["a", "abcde"]) == ["a", "abcde"]
    with pytest.raises(InputProblem, match="2.0 megapixels"):
        Limits(max_megapixels=1).check_pixels(2000, 1000)


def test_limits_from_options_and_bad_values():
    options = Namespace(max_classes=10, max_name_chars=20, max_megapixels=2.0, max_video_frames=5,
                        max_video_seconds=1.5, time_limit=3.0, max_queue=2)
    limits = Limits.from_options(options)
    assert (limits.max_classes, limits.time_limit_s, limits.max_queue) == (10, 3.0, 2)
    assert limits.video_frames(30.0) == 5 and limits.video_frames(2.0) == 3 and limits.video_frames(None) == 5
    with pytest.raises(ValueError, match=r"--max-classes must be >= 1, got 0.*--time-limit must be > 0 seconds"):
        Limits(max_classes=0, time_limit_s=0)


def test_page_vocabularies_are_those_within_the_class_bound():
    assert serve_app.vocabularies_within(Limits(max_classes=100)) == ["pc59", "voc20", "voc20b"]
    assert "ade847" in serve_app.vocabularies_within(Limits())


def test_deadline_and_forward_estimate():
    clock = SteppingClock(1.0)
    deadline = Deadline(1.5, clock=clock)  # starts at 1 s
    deadline.check("step one")  # read at 2 s: 1 s used
    with pytest.raises(TimeLimitExceeded, match="limit of 1.5 s per request .*before step two"):
        deadline.check("step two")  # read at 3 s: 2 s used

    times = LinearTimes()
    assert times.estimate(10) is None
    times.add(10, 2.0)
    assert times.estimate(20) == pytest.approx(4.0)  # one class count: proportional
    times.add(30, 4.0)  # 1 s + 0.1 s per class
    assert times.estimate(100) == pytest.approx(11.0)
    with pytest.raises(TimeLimitExceeded, match="would take about 11 s"):
        Deadline(5.0, clock=lambda: 0.0).check_estimate(times.estimate(100), "the model's forward")


@pytest.fixture
def small_chunks(monkeypatch):
    """Text embeddings 3 names at a time (the CPU cost of these tests is the text encoder's)."""
    monkeypatch.setattr(serve_app, "TEXT_CHUNK", 3)


def test_time_limit_stops_text_encoding_between_chunks_then_a_normal_request_completes(model, picture,
                                                                                      small_chunks):
    names = ", ".join(f"thing {i}" for i in range(3 * serve_app.TEXT_CHUNK))
    segmenter = Segmenter(model, random_weights=True, limits=Limits(time_limit_s=1.5), clock=SteppingClock(1.0))
    # The first name is encoded alone, measured at 1 s; the next check reads 4 s used.
    with pytest.raises(TimeLimitExceeded, match="before computing the text embeddings of classes 2 to 9"):
        segmenter.segment_image(picture, names, TYPED, EXACT, 8)
    assert segmenter.text_encodings == 0, "a stopped vocabulary is not cached"

    segmenter.clock = SteppingClock(0.0)  # time stands still
    segmenter.limits = Limits(time_limit_s=60.0)  # and 1 s per name measured above fits
    overlay, _, rows, _ = segmenter.segment_image(picture, "cat, grass", TYPED, EXACT, 8)
    assert overlay is not None and sum(row[2] for row in rows) == 48 * 64


def test_chunked_text_embeddings_equal_one_call(model, small_chunks):
    import torch

    names = [f"object number {i}" for i in range(serve_app.TEXT_CHUNK + 3)]
    segmenter = Segmenter(model, random_weights=True)
    assert segmenter._set_vocabulary(list(names), Deadline(1e9)) == names  # 1 name, then chunks of 3
    chunked = model.text_embeddings.clone()
    model.set_vocabulary(list(names), progress=False)
    torch.testing.assert_close(chunked, model.text_embeddings, rtol=1e-5, atol=1e-6)
    last = len(names) + 1
    with pytest.raises(InputProblem, match=rf"Class names 1 \('object number 0'\) and {last} .* same once tokenized"):
        segmenter._set_vocabulary([*names, "Object Number 0"], Deadline(1e9))  # in another chunk than its twin


def test_forward_estimate_refuses_a_request_that_cannot_finish_in_time(model, picture):
    segmenter = Segmenter(model, random_weights=True, limits=Limits(time_limit_s=30.0), clock=lambda: 0.0)
    segmenter.forward_times.add(2, 100.0)  # as if a forward of 2 classes had taken 100 s
    with pytest.raises(TimeLimitExceeded, match="would take about 100 s"):
        segmenter.segment_image(picture, "cat, grass", TYPED, EXACT, 8)
    segmenter = Segmenter(model, random_weights=True, limits=Limits(time_limit_s=30.0), clock=lambda: 0.0)
    segmenter.text_times.add(1, 10.0)  # as if one name's text embeddings had taken 10 s
    with pytest.raises(TimeLimitExceeded, match="classes 1 to 9 would take about 90 s"):
        segmenter.segment_image(picture, ", ".join(f"new {i}" for i in range(9)), TYPED, EXACT, 8)


def test_time_limit_stops_a_clip_between_batches(model, tmp_path):
    clip = write_clip(tmp_path / "c.mp4", frames=12)
    segmenter = Segmenter(model, random_weights=True, limits=Limits(time_limit_s=0.1), clock=SteppingClock(0.2))
    segmenter._set_vocabulary(["cat", "grass"])  # cached: the clock is read only for the frames
    with pytest.raises(TimeLimitExceeded, match="before segmenting frame 5"):  # after the first batch of 4
        segmenter.segment_clip(str(clip), "cat, grass", TYPED, EXACT, 8, out_dir=tmp_path / "o")


def test_clip_is_cut_at_the_seconds_bound(model, tmp_path):
    clip = write_clip(tmp_path / "c.mp4", frames=12)
    import av

    with av.open(str(clip)) as container:
        rate = float(container.streams.video[0].average_rate)
    limits = Limits(max_video_seconds=3 / rate)  # three frames' worth
    segmenter = Segmenter(model, random_weights=True, limits=limits)
    video, _, timing = segmenter.segment_clip(str(clip), "cat, grass", TYPED, EXACT, 8, out_dir=tmp_path / "o")
    with av.open(video) as container:
        assert len(list(container.decode(video=0))) == 3
    assert "stopped at the app's limit of 3 frames" in timing


def _relative_luminance(hex_colour: str) -> float:
    channels = [int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def test_random_weights_banner_contrast_is_wcag_aa():
    text, background = serve_app.BANNER_TEXT, serve_app.BANNER_BACKGROUND
    lighter, darker = sorted((_relative_luminance(text), _relative_luminance(background)), reverse=True)
    assert (lighter + 0.05) / (darker + 0.05) >= 4.5
    banner = serve_app.random_weights_banner()
    # Every element sets its own text colour (the theme's colours for <code> cannot apply).
    assert banner.count("<") // 2 == banner.count(f"color:{text}")
    assert f"background:{background}" in banner and "noise" in banner


def test_app_has_named_endpoints_and_a_bounded_queue(model):
    segmenter = Segmenter(model, random_weights=True, limits=Limits(max_queue=3, max_classes=100))
    app = serve_app.build_app(segmenter)
    names = {dependency.get("api_name") for dependency in app.config["dependencies"]}
    assert {"segment_image", "segment_clip"} <= names
    assert "at most 100 classes" in str(app.config)
    assert serve_app.launch_kwargs("127.0.0.1", 7860)["share"] is False


def test_serve_command_refuses_bad_bounds(capsys):
    from sed_fast import cli

    assert cli.main(["serve", "--max-classes", "0", "--time-limit", "-1"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--max-classes must be >= 1, got 0" in err and "--time-limit must be > 0 seconds, got -1.0" in err
