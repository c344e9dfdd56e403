"""`sed-fast demo`: the built-in sample, segmented with random weights, outputs where it says."""
import json

import numpy as np
import pytest
from PIL import Image

from sed_fast import cli, demo

pytestmark = pytest.mark.filterwarnings("ignore::sed_fast.RandomWeightsWarning")


def test_sample_scene_is_deterministic():
    first, second = np.asarray(demo.draw_sample()), np.asarray(demo.draw_sample())
    assert first.shape == (*demo.SAMPLE_SIZE, 3) and first.dtype == np.uint8
    assert np.array_equal(first, second)
    assert len(np.unique(first.reshape(-1, 3), axis=0)) > 20  # a scene, not a flat colour


def test_demo_writes_its_outputs_and_says_weights_are_random(tmp_path, capsys):
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / run
        code = cli.main(["demo", "--out", str(out), "--vocab", "cat,grass", "--resolution", "64",
                         "--device", "cpu"])
        assert code == cli.EXIT_OK
        said = capsys.readouterr()
        assert "RANDOM WEIGHTS" in said.out and str(out.resolve()) in said.out
        for name in ("sample.png", "sample_labels.png", "sample_overlay.png", "summary.json"):
            assert (out / name).is_file(), name
        summary = json.loads((out / "summary.json").read_text())
        assert summary["random_weights"] is True and summary["images"][0]["status"] == "ok"
        outputs.append(np.asarray(Image.open(out / "sample_labels.png")))
    assert outputs[0].shape == demo.SAMPLE_SIZE
    assert np.array_equal(outputs[0], outputs[1]), "two demo runs (same seed) must give the same labels"


def test_demo_unwritable_out_is_a_usage_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert cli.main(["demo", "--out", str(blocker / "sub"), "--quiet"]) == cli.EXIT_USAGE
    assert "sed-fast demo: error: cannot write the sample image into" in capsys.readouterr().err


def test_the_demo_is_a_front_that_rewrites_its_command_line(tmp_path):
    """The demo stands for a segment (or serve) command line, which sed_fast.cli runs."""
    run = demo.command_line(["--out", str(tmp_path), "--vocab", "cat,grass", "--quiet"])
    assert run.command == "segment" and (tmp_path / "sample.png").is_file()
    assert run.argv[0] == str(tmp_path / "sample.png") and "--random-weights" in run.argv and "--quiet" in run.argv
    assert "RANDOM WEIGHTS" in run.done_message
    ui = demo.command_line(["--ui", "--port", "7861"])
    assert (ui.command, ui.argv) == ("serve", ["--port", "7861", "--random-weights"])
    assert demo.command_line(["--ui", "--checkpoint=model.pth"]).argv == ["--checkpoint=model.pth"]
