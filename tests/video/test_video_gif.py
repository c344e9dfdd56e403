"""An animated GIF given to ``segment`` is a video (PyAV decodes GIFs); a still GIF stays an image."""
import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image
from video_clips import decode

import sed_fast.api
from fake_model import FakeModel
from sed_fast import cli
from sed_fast.video import is_animated_gif, split_inputs

pytestmark = pytest.mark.filterwarnings("ignore::sed_fast.RandomWeightsWarning")
ARGS = ["--vocab", "cat,dog,grass", "--random-weights", "--resolution", "64", "--device", "cpu", "--quiet"]
HEIGHT, WIDTH = 40, 48


def run_main(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, err.getvalue()


def write_gif(path, frames):
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))
              for i in range(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == frames
    return path


def test_an_animated_gif_gives_an_overlay_video_of_all_its_frames(tmp_path, monkeypatch):
    monkeypatch.setattr(sed_fast.api, "build_sed", lambda variant, **kwargs: FakeModel())
    gif = write_gif(tmp_path / "anim.gif", 3)
    out = tmp_path / "out"
    code, err = run_main(["segment", gif, *ARGS, "--out", out, "--save-labels", "npz"])
    assert code == cli.EXIT_OK, err
    assert "frame 0 of" not in err
    frames, rate, width, height = decode(out / "anim_overlay.mp4")
    assert (len(frames), width, height) == (3, WIDTH, HEIGHT)
    assert rate == 10  # 100 ms per frame
    with np.load(out / "anim_labels.npz") as saved:
        assert list(saved["frame_indices"]) == [0, 1, 2]
    assert not (out / "anim_labels.png").exists() and not (out / "anim_overlay.png").exists()


def test_a_still_gif_stays_an_image(tmp_path, monkeypatch):
    monkeypatch.setattr(sed_fast.api, "build_sed", lambda variant, **kwargs: FakeModel())
    gif = write_gif(tmp_path / "still.gif", 1)
    assert not is_animated_gif(gif)
    out = tmp_path / "out"
    code, err = run_main(["segment", gif, *ARGS, "--out", out])
    assert code == cli.EXIT_OK, err
    assert (out / "still_labels.png").exists() and not list(out.glob("*.mp4"))
    record = json.loads((out / "summary.json").read_text())["images"][0]
    assert "num_frames" not in record


def test_which_gifs_are_videos(tmp_path):
    animated = write_gif(tmp_path / "a.gif", 3)
    still = write_gif(tmp_path / "s.gif", 1)
    (tmp_path / "fake.gif").write_text("not a gif")
    assert is_animated_gif(animated) and not is_animated_gif(still)
    assert not is_animated_gif(tmp_path / "fake.gif") and not is_animated_gif(tmp_path / "missing.gif")
    assert split_inputs([str(animated), str(still)]) == ([str(animated)], [str(still)])
    # Folders and patterns are not searched for GIFs (nor are they by the image path).
    assert split_inputs([str(tmp_path)]) == ([], [str(tmp_path)])
