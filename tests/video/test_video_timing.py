"""The video summary says where the wall time went: decode, model, encode and waiting, apart."""
import contextlib
import io
import json
import time

import pytest
from video_clips import write_clip

import sed_fast.api
from fake_model import FakeModel
from sed_fast import cli

pytestmark = pytest.mark.filterwarnings("ignore::sed_fast.RandomWeightsWarning")
ARGS = ["--vocab", "cat,dog,grass", "--random-weights", "--resolution", "64", "--device", "cpu"]


class SlowModel(FakeModel):
    """Takes ``seconds`` per batch: the decoder must wait for it, and that wait is not decoding."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def predict_labels(self, images):
        time.sleep(self.seconds)
        return super().predict_labels(images)


def run(monkeypatch, model, clip, out, *extra):
    monkeypatch.setattr(sed_fast.api, "build_sed", lambda variant, **kwargs: model)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in ["segment", clip, *ARGS, "--out", out, *extra]])
    assert code == cli.EXIT_OK, err.getvalue()
    return json.loads((out / "summary.json").read_text())["videos"][0], err.getvalue()


def test_parts_add_up_to_the_wall_time_with_the_tiny_model(tmp_path, monkeypatch, clip):
    model = sed_fast.api.build_sed("b", impl="fast", device="cpu", clip_resolution=64)
    record, err = run(monkeypatch, model, clip, tmp_path / "out", "--batch-size", "2", "--save-labels", "npz")
    times = record["time_s"]
    wall = times["wall"]
    assert wall == pytest.approx(record["seconds"], rel=0.05)
    measured = sum(value for name, value in times["main"].items() if name != "unaccounted")
    assert measured == pytest.approx(wall, rel=0.10), times
    assert times["main"]["model"] > 0 and times["encoder"]["encode"] > 0 and times["decoder"]["decode"] > 0
    # the encoder's thread runs (nearly) the whole time too: its work and its waiting fill it
    encoder = sum(times["encoder"].values())
    assert encoder <= wall * 1.01 and encoder == pytest.approx(wall, rel=0.10), times
    assert times["pace_set_by"] in {"model", "decoder", "encoder"}
    assert "model" in err and "waiting for decoded frames" in err and "sets the pace" in err


def test_waiting_for_the_model_is_not_counted_as_decoding(tmp_path, monkeypatch):
    clip = write_clip(tmp_path / "long.mp4", frames=16)
    record, err = run(monkeypatch, SlowModel(0.1), clip, tmp_path / "out", "--quiet")
    times = record["time_s"]
    # 16 frames at 0.1 s each behind a queue of 4: the decoder spends most of the run blocked on it
    assert times["main"]["model"] >= 16 * 0.1
    assert times["decoder"]["waiting_for_model"] > 0.5
    assert record["seconds_per_frame"]["decode"] < 0.05 < 0.1 <= record["seconds_per_frame"]["model"]
    assert times["decoder"]["decode"] < times["decoder"]["waiting_for_model"]
    assert times["pace_set_by"] == "model"
    assert times["encoder"]["waiting_for_model"] > 0.5  # the encoder idles between the model's frames too
    measured = sum(value for name, value in times["main"].items() if name != "unaccounted")
    assert measured == pytest.approx(times["wall"], rel=0.10), times
