"""`sed-fast segment` on video files: outputs, labels, interrupts, broken inputs, cameras."""
import contextlib
import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from video_clips import HEIGHT, RATE, WIDTH, decode, write_clip
from PIL import Image

import sed_fast.api
from fake_model import FakeModel
from sed_fast import cli
from sed_fast.toolkit.errors import Interrupted
from sed_fast.toolkit.outputs import CLAIM_NAME
from sed_fast.video import io as video_io

pytestmark = pytest.mark.filterwarnings("ignore::sed_fast.RandomWeightsWarning")
VOCAB = "cat,dog,grass"
ARGS = ["--vocab", VOCAB, "--random-weights", "--resolution", "64", "--device", "cpu", "--quiet"]
REPO = Path(__file__).resolve().parents[2]


def run_main(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, err.getvalue()


def use_model(monkeypatch, model):
    monkeypatch.setattr(sed_fast.api, "build_sed", lambda variant, **kwargs: model)


@pytest.fixture(scope="module")
def sed_model():
    """The real (fast) model at a tiny resolution, random weights, built once for the module."""
    return sed_fast.api.build_sed("b", impl="fast", device="cpu", clip_resolution=64)


def read_summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_overlay_video_and_labels_match_predict_labels(tmp_path, monkeypatch, clip, sed_model):
    use_model(monkeypatch, sed_model)
    out = tmp_path / "out"
    code, err = run_main(["segment", clip, *ARGS, "--out", out, "--batch-size", "3", "--save-labels", "npz"])
    assert code == cli.EXIT_OK, err
    frames, rate, width, height = decode(clip)
    overlay, out_rate, out_width, out_height = decode(out / "shapes_overlay.mp4")
    assert len(overlay) == len(frames) == 7
    assert (out_rate, out_width, out_height) == (rate, width, height) == (RATE, WIDTH, HEIGHT)

    # The same frames, decoded here, through predict_labels in the same batches of 3.
    expected = []
    for first in range(0, len(frames), 3):
        batch = torch.from_numpy(np.stack(frames[first:first + 3])).permute(0, 3, 1, 2)
        expected.extend(sed_model.predict_labels(batch).numpy())
    with np.load(out / "shapes_labels.npz") as saved:
        assert list(saved["frame_indices"]) == list(range(7))
        for i, labels in enumerate(expected):
            assert saved[f"frame_{i:06d}"].dtype == np.uint8
            assert np.array_equal(saved[f"frame_{i:06d}"], labels), f"frame {i}"

    summary = read_summary(out)
    assert summary["status"] == "complete" and summary["random_weights"] is True
    record = summary["videos"][0]
    assert record["status"] == "ok" and record["frames_written"] == 7 and record["encoder"] == "libx264"
    assert record["fps_in"] == record["fps_out"] == RATE
    assert set(record["seconds_per_frame"]) == {"decode", "model", "overlay", "encode", "labels"}
    present = {c["name"]: c for c in record["classes"]}
    counts = np.zeros(3, int)
    for labels in expected:
        counts[np.unique(labels)] += 1
    assert {name: c["frames"] for name, c in present.items()} == \
        {name: int(n) for name, n in zip(VOCAB.split(","), counts) if n}
    # the overlay frames are the input blended with the class colours, not the input itself
    assert np.abs(overlay[0].astype(int) - frames[0].astype(int)).mean() > 10


def test_batch_of_one_labels_equal_single_frame_predict_labels(tmp_path, monkeypatch, clip, sed_model):
    use_model(monkeypatch, sed_model)
    out = tmp_path / "out"
    code, err = run_main(["segment", clip, *ARGS, "--out", out, "--every", "3", "--save-labels", "png"])
    assert code == cli.EXIT_OK, err
    frames, rate, _, _ = decode(clip)
    names = sorted(p.name for p in (out / "shapes_labels").iterdir())
    assert names == ["frame_000000.png", "frame_000003.png", "frame_000006.png"]
    for index in (0, 3, 6):
        expected = sed_model.predict_labels(torch.from_numpy(frames[index]).permute(2, 0, 1))
        with Image.open(out / "shapes_labels" / f"frame_{index:06d}.png") as png:
            assert png.text.get("sed_fast") == "random_weights"
            assert np.array_equal(np.asarray(png), expected[0].numpy())
    overlay, out_rate, _, _ = decode(out / "shapes_overlay.mp4")
    assert len(overlay) == 3 and out_rate == rate / 3
    assert read_summary(out)["videos"][0]["fps_out"] == pytest.approx(RATE / 3)


def test_max_frames_and_progress_line(tmp_path, monkeypatch, clip):
    use_model(monkeypatch, FakeModel())
    out = tmp_path / "out"
    code, err = run_main(["segment", clip, *[a for a in ARGS if a != "--quiet"], "--out", out, "--max-frames", "4"])
    assert code == cli.EXIT_OK, err
    assert len(decode(out / "shapes_overlay.mp4")[0]) == 4
    assert "frame/s" in err and "4/4" in err  # tqdm: count, rate and ETA
    assert "H.264 (libx264)" in err


def test_mpeg4_when_libx264_is_missing(tmp_path, monkeypatch, clip):
    use_model(monkeypatch, FakeModel())
    monkeypatch.setattr(video_io, "ENCODERS", ("no_such_encoder", "mpeg4"))
    out = tmp_path / "out"
    code, err = run_main(["segment", clip, *[a for a in ARGS if a != "--quiet"], "--out", out])
    assert code == cli.EXIT_OK, err
    assert "MPEG-4 part 2 (mpeg4) (libx264 is not in this PyAV's FFmpeg)" in err
    with video_io.import_av().open(str(out / "shapes_overlay.mp4")) as container:
        assert container.streams.video[0].codec_context.name == "mpeg4"
        assert len(list(container.decode(video=0))) == 7


class InterruptingModel(FakeModel):
    """Raises the CLI's Interrupted (what its SIGINT handler raises) on the given forward."""

    def __init__(self, at_call: int):
        self.calls, self.at_call = 0, at_call

    def predict_labels(self, images):
        self.calls += 1
        if self.calls == self.at_call:
            raise Interrupted(signal.SIGINT)
        return super().predict_labels(images)


def test_interrupt_finalises_a_playable_partial_video(tmp_path, monkeypatch, clip):
    use_model(monkeypatch, InterruptingModel(at_call=3))
    out = tmp_path / "out"
    code, err = run_main(["segment", clip, *ARGS, "--out", out, "--batch-size", "2", "--save-labels", "npz"])
    assert code == cli.EXIT_SIGINT
    assert "interrupted in" in err and "4 segmented frame(s): 4 frame(s) written" in err and "plays" in err
    assert "Traceback" not in err
    frames, rate, width, height = decode(out / "shapes_overlay.mp4")
    assert len(frames) == 4 and (rate, width, height) == (RATE, WIDTH, HEIGHT)
    with np.load(out / "shapes_labels.npz") as saved:
        assert list(saved["frame_indices"]) == [0, 1, 2, 3]
    summary = read_summary(out)
    assert summary["status"] == "interrupted" and summary["exit_code"] == 130
    assert summary["videos"][0]["status"] == "interrupted" and summary["videos"][0]["frames_written"] == 4
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != CLAIM_NAME], \
        "no temporary file is left"


_SLOW_RUN = """
import sys, time
sys.path.insert(0, {tests!r})
import sed_fast.api
from fake_model import FakeModel
from sed_fast import cli

class Slow(FakeModel):
    def predict_labels(self, images):
        time.sleep(0.3)
        return super().predict_labels(images)

sed_fast.api.build_sed = lambda variant, **kwargs: Slow()
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_real_signal_leaves_a_playable_video(tmp_path, clip, signum):
    long_clip = write_clip(tmp_path / "long.mp4", frames=60)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen([sys.executable, "-c", _SLOW_RUN.format(tests=str(REPO / "tests")), "segment",
                                str(long_clip), *ARGS, "--out", str(out)], env=env,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until frames are flowing (the summary says running)
            try:
                if read_summary(out)["videos"][0].get("frames_segmented", 0) >= 2:
                    break
            except (OSError, ValueError, KeyError, IndexError):
                pass
            time.sleep(0.1)
        else:
            pytest.fail("the run never got going")
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signum, err
    assert "Traceback" not in err and "interrupted in" in err
    frames, rate, _, _ = decode(out / "long_overlay.mp4")
    assert 2 <= len(frames) < 60 and rate == RATE
    record = read_summary(out)["videos"][0]
    assert record["status"] == "interrupted" and record["frames_written"] == len(frames)


def test_truncated_mp4_is_a_clear_usage_error(tmp_path, clip):
    broken = tmp_path / "cut.mp4"
    broken.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])  # the MP4 index is at the end
    code, err = run_main(["segment", broken, *ARGS, "--out", tmp_path / "out"])
    assert code == cli.EXIT_USAGE
    assert "cut.mp4" in err and "truncated" in err and "Traceback" not in err


def test_truncated_mkv_segments_what_is_there_and_says_so(tmp_path, monkeypatch):
    use_model(monkeypatch, FakeModel())
    whole = write_clip(tmp_path / "whole.mkv", frames=10, codec="mjpeg", fmt="matroska", pix_fmt="yuvj420p")
    data = whole.read_bytes()
    broken = tmp_path / "cut.mkv"
    broken.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    code, err = run_main(["segment", broken, *ARGS, "--out", out])
    assert code == cli.EXIT_FAILED
    record = read_summary(out)["videos"][0]
    assert record["status"] == "truncated" and "looks truncated" in err and "of the 10" in err
    assert 0 < record["frames_written"] < 10
    assert len(decode(out / "cut_overlay.mp4")[0]) == record["frames_written"]


def test_corrupt_frame_is_skipped_and_counted(tmp_path, monkeypatch):
    use_model(monkeypatch, FakeModel())
    path = write_clip(tmp_path / "c.mkv", frames=8, codec="mjpeg", fmt="matroska", pix_fmt="yuvj420p")
    with video_io.import_av().open(str(path)) as container:
        packets = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
    data = bytearray(path.read_bytes())
    pos, size = packets[3]
    data[pos + 20:pos + size - 20] = bytes(size - 40)  # JPEG data of frame 3 zeroed
    path.write_bytes(bytes(data))
    out = tmp_path / "out"
    code, err = run_main(["segment", path, *ARGS, "--out", out])
    assert code == cli.EXIT_OK, err
    assert "1 corrupt frame(s) skipped" in err and "Traceback" not in err
    record = read_summary(out)["videos"][0]
    assert record["corrupt_frames"] == 1 and record["frames_written"] == 7 and record["status"] == "ok"
    assert len(decode(out / "c_overlay.mp4")[0]) == 7


def test_not_a_video_and_missing_file(tmp_path):
    fake = tmp_path / "notes.mp4"
    fake.write_text("not a video at all")
    code, err = run_main(["segment", fake, *ARGS, "--out", tmp_path / "out"])
    assert code == cli.EXIT_USAGE and "no valid media" in err and "Traceback" not in err
    code, err = run_main(["segment", tmp_path / "nope.mp4", *ARGS, "--out", tmp_path / "out"])
    assert code == cli.EXIT_USAGE and "video file not found" in err


def test_absent_camera_is_a_clear_error(tmp_path):
    code, err = run_main(["segment", "--camera", "97", *ARGS, "--out", tmp_path / "out"])
    assert code == cli.EXIT_USAGE
    assert "camera 97 (/dev/video97) does not exist" in err and "Traceback" not in err


def test_busy_camera_and_dead_stream_messages():
    busy = video_io._open_error("camera 0 (/dev/video0)", OSError(errno.EBUSY, "Device or resource busy"), "camera")
    assert "is busy: another program is using it" in str(busy)
    dead = video_io._open_error("rtsp://127.0.0.1:9/x", OSError(errno.ECONNREFUSED, "Connection refused"), "url")
    assert "cannot open the stream rtsp://127.0.0.1:9/x: Connection refused" in str(dead)


def test_dead_stream_url_is_a_clear_error(tmp_path):
    code, err = run_main(["segment", "http://127.0.0.1:9/stream.mp4", *ARGS, "--out", tmp_path / "out"])
    assert code == cli.EXIT_USAGE
    assert "cannot open the stream http://127.0.0.1:9/stream.mp4" in err and "Traceback" not in err


def test_usage_errors(tmp_path, clip):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
    code, err = run_main(["segment", clip, image, *ARGS, "--out", tmp_path / "o"])
    assert code == cli.EXIT_USAGE and "not both" in err
    code, err = run_main(["segment", image, *ARGS, "--out", tmp_path / "o", "--save-labels", "png"])
    assert code == cli.EXIT_USAGE and "--save-labels are for videos" in err
    code, err = run_main(["segment", clip, *ARGS, "--out", tmp_path / "o", "--every", "0"])
    assert code == cli.EXIT_USAGE and "--every must be >= 1" in err
    code, err = run_main(["segment", *ARGS, "--out", tmp_path / "o"])
    assert code == cli.EXIT_USAGE and "no images given" in err


def test_video_served_over_http(tmp_path, monkeypatch, clip):
    import functools
    import http.server
    import threading

    use_model(monkeypatch, FakeModel())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(clip.parent))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{clip.name}"
        out = tmp_path / "out"
        code, err = run_main(["segment", url, *ARGS, "--out", out])
    finally:
        server.shutdown()
    assert code == cli.EXIT_OK, err
    record = read_summary(out)["videos"][0]
    assert record["live"] is False and record["frames_written"] == 7 and record["dropped_frames"] == 0
    overlay = out / f"127.0.0.1_{server.server_address[1]}_shapes_overlay.mp4"
    assert record["outputs"]["overlay"] == overlay.name, record["outputs"]
    assert len(decode(overlay)[0]) == 7


def test_odd_frame_size_keeps_its_size(tmp_path, monkeypatch):
    use_model(monkeypatch, FakeModel())
    clip = write_clip(tmp_path / "odd.mp4", frames=3, pix_fmt="yuv444p", width=97, height=65)
    out = tmp_path / "out"
    code, err = run_main(["segment", clip, *ARGS, "--out", out])
    assert code == cli.EXIT_OK, err
    frames, _, width, height = decode(out / "odd_overlay.mp4")
    assert (len(frames), width, height) == (3, 97, 65)


def test_several_videos_one_missing(tmp_path, monkeypatch, clip):
    use_model(monkeypatch, FakeModel())
    other = tmp_path / "sub"
    other.mkdir()
    second = write_clip(other / clip.name, frames=2)  # the same stem: outputs must not collide
    out = tmp_path / "out"
    code, err = run_main(["segment", clip, tmp_path / "missing.mp4", second, *ARGS, "--out", out])
    assert code == cli.EXIT_FAILED
    assert "video file not found" in err
    records = read_summary(out)["videos"]
    assert [r["status"] for r in records] == ["ok", "error", "ok"]
    assert records[0]["outputs"]["overlay"] != records[2]["outputs"]["overlay"]
    assert len(decode(out / records[0]["outputs"]["overlay"])[0]) == 7
    assert len(decode(out / records[2]["outputs"]["overlay"])[0]) == 2


def test_live_source_drops_frames_when_the_model_lags(clip):
    source = video_io.open_source(str(clip))
    source.live = True  # as a camera: the reader never waits for the model
    reader = video_io.FrameReader(source, capacity=2)
    reader.start()
    reader.join(timeout=30)  # nobody reads: the queue fills and the oldest frames go
    received = []
    while (frame := reader.get()) is not None:
        received.append(frame.index)
    source.close()
    stats = reader.stats
    assert stats.decoded == 7 and stats.dropped > 0
    assert len(received) + stats.dropped == 7 and received == sorted(received) and received[-1] == 6


def test_output_folder_held_by_another_run_is_a_usage_error(tmp_path, clip):
    from sed_fast.toolkit.outdir_lock import exclusive_output_dir

    out = tmp_path / "out"
    with exclusive_output_dir(out, "another run"):
        code, err = run_main(["segment", clip, *ARGS, "--out", out])
    assert code == cli.EXIT_USAGE and str(os.getpid()) in err, err


def test_fifo_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    code, err = run_main(["segment", fifo, *ARGS, "--out", tmp_path / "out"])
    assert code == cli.EXIT_USAGE and "named pipe (FIFO), not a regular file" in err, err


def test_users_files_in_out_are_left_alone(tmp_path, monkeypatch, clip):
    """The --out rule: a user's model_final.pth and an unrelated file in --out stay byte-identical."""
    use_model(monkeypatch, FakeModel())
    out = tmp_path / "out"
    out.mkdir()
    (out / "model_final.pth").write_bytes(b"the user's weights")
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, err = run_main(["segment", clip, *ARGS, "--out", out])
    assert code == cli.EXIT_OK, err
    assert {name: (out / name).read_bytes() for name in before} == before
    summary = read_summary(out)
    assert summary["pid"] == os.getpid() and summary["host"] and summary["run"]["pid"] == os.getpid()
