"""A real Ctrl-C (SIGINT), SIGTERM or SIGHUP during ``sed-fast eval`` with loader workers keeps the
finished images and exits 128 + the signal's number; ``--resume`` then gives the uninterrupted result."""
import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval_synthetic import TINY, write_label
from sed_fast import cli

ROOT = Path(__file__).resolve().parents[2]
COUNT = 40


@pytest.mark.skipif(sys.platform == "win32", reason="signals to a child process are POSIX")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_saves_then_resume_completes(tmp_path, shared_build, signum):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(5)
    for i in range(COUNT):
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(images / f"s{i:02d}.png")
        label = rng.integers(0, 3, (32, 40))
        label[:2] = 255
        write_label(labels / f"s{i:02d}.png", label, ".png")
    common = ["eval", "--images", str(images), "--labels", str(labels), "--vocab", ",".join(TINY), "--ignore", "255",
              "--random-weights", "--resolution", "64", "--device", "cpu", "--impl", "reference", "--no-plot",
              "--save-every", "1000", "--progress-every", "0"]
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-m", "sed_fast", *common, "--workers", "1", "--out", str(out)],
                             cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    deadline = time.monotonic() + 180
    for line in child.stderr:  # progress lines: one per image
        seen.append(line)
        if f"2/{COUNT} images" in line or time.monotonic() > deadline:
            child.send_signal(signum)
            break
    err = "".join(seen) + child.stderr.read()  # the same buffered reader: nothing lost
    child.wait(timeout=120)
    assert child.returncode == 128 + signum, err
    assert signal.Signals(signum).name in err
    assert "--resume" in err and "Traceback" not in err
    state = torch.load(out / "eval_state.pt", weights_only=True)
    kept = len(state["finished"])
    assert 2 <= kept < COUNT  # nothing was saved before the signal but what the interrupt merged
    # the rest in this process (same weights and one thread, as in the child), then all in one go
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert cli.main([*common, "--workers", "0", "--out", str(out), "--resume"]) == 0
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert cli.main([*common, "--workers", "0", "--out", str(tmp_path / "full")]) == 0
    assert np.array_equal(np.load(out / "confusion.npy"), np.load(tmp_path / "full" / "confusion.npy"))
