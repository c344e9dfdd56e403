"""``torchrun --nproc-per-node 2`` (gloo, CPU) gives exactly the one-process confusion matrix."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval_synthetic import TINY, write_label
from sed_fast.evaluation.distributed import shard
from sed_fast.evaluation.runner import sync_plan

ROOT = Path(__file__).resolve().parents[2]


def _torchrun_problem() -> str:
    if not torch.distributed.is_available():
        return "this PyTorch build has no torch.distributed"
    try:
        found = importlib.util.find_spec("torch.distributed.run") is not None  # torchrun's module
    except ImportError:
        found = False
    if not found:
        return "torchrun (torch.distributed.run) is not available"
    if not torch.distributed.is_gloo_available():
        return "the gloo backend is not available"
    return ""


def test_shards_cover_every_image_once():
    indices = list(range(11))
    parts = [shard(indices, r, 3) for r in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert sorted(sum(parts, [])) == indices


@pytest.mark.parametrize("todo, world, batch, save_every, plan", [
    (5, 2, 1, 2, (1, 3)),     # 3 and 2 images: rank 1 passes the last sync point with nothing to do
    (5, 2, 2, 2, (2, 2)),     # the step is a whole number of batches
    (5, 2, 1, 0, (3, 1)),     # no periodic saves: one sync point at the end
    (0, 4, 1, 10, (1, 0)),    # nothing left (a finished evaluation resumed)
    (100, 1, 8, 30, (32, 4)),
])
def test_sync_plan(todo, world, batch, save_every, plan):
    step, syncs = sync_plan(todo, world, batch, save_every)
    assert (step, syncs) == plan
    longest = -(-todo // world)
    assert step % batch == 0 and (syncs == 0 or (syncs - 1) * step < longest <= syncs * step)


@pytest.mark.skipif(bool(_torchrun_problem()), reason=_torchrun_problem() or "torchrun available")
def test_torchrun_two_processes_equal_one(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(3)
    for i in range(5):  # odd: the two shards differ in length
        h, w = 34 + 3 * i, 48 - 2 * i
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"p{i}.jpg")
        label = rng.integers(0, 3, (h, w))
        label[:4] = 255
        write_label(labels / f"p{i}.png", label, ".png")
    common = ["eval", "--images", str(images), "--labels", str(labels), "--vocab", ",".join(TINY), "--ignore", "255",
              "--random-weights", "--resolution", "64", "--device", "cpu", "--workers", "0", "--impl", "reference",
              "--save-every", "2", "--no-plot", "--progress-every", "0"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")  # same threads in every process
    single = subprocess.Popen([sys.executable, "-m", "sed_fast", *common, "--out", str(tmp_path / "one")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    multi = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              "-m", "sed_fast", *common, "--out", str(tmp_path / "two")],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_single, err_single = single.communicate(timeout=240)
    out_multi, err_multi = multi.communicate(timeout=240)
    assert single.returncode == 0, err_single
    assert multi.returncode == 0, err_multi
    one = np.load(tmp_path / "one" / "confusion.npy")
    two = np.load(tmp_path / "two" / "confusion.npy")
    assert one.sum() == sum((34 + 3 * i) * (48 - 2 * i) for i in range(5))  # every pixel, once
    assert np.array_equal(one, two)
    assert out_multi == out_single and out_multi.count("copypaste: Task:") == 1  # only rank 0 reports
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["config"]["world_size"] == 2 and results["images"]["evaluated"] == 5
    assert "rank 0 of 2" in err_multi  # rank 0's progress lines
    reference = json.loads((tmp_path / "one" / "results.json").read_text())
    assert results["models"] == reference["models"]
