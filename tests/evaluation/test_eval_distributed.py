"""``torchrun --nproc-per-node 2`` (gloo, CPU) gives exactly the one-process confusion matrix."""
import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from eval_synthetic import TINY, patch_build, write_label
from sed_fast import cli
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


needs_torchrun = pytest.mark.skipif(bool(_torchrun_problem()), reason=_torchrun_problem() or "torchrun available")
SIZES = [(34 + 3 * i, 48 - 2 * i) for i in range(5)]  # odd count: the two shards differ in length


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")  # one thread in every process


def _torchrun(args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "sed_fast", *args]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_cache):
    """The same evaluation under torchrun with two processes and, meanwhile, in this process (one
    thread, as each torchrun process: the same numerics as a fresh one-process run)."""
    tmp_path = tmp_path_factory.mktemp("dist")
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(3)
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"p{i}.jpg")
        label = rng.integers(0, 3, (h, w))
        label[:4] = 255
        write_label(labels / f"p{i}.png", label, ".png")
    common = ["eval", "--images", str(images), "--labels", str(labels), "--vocab", ",".join(TINY), "--ignore", "255",
              "--random-weights", "--resolution", "64", "--device", "cpu", "--workers", "0", "--impl", "reference",
              "--save-every", "2", "--no-plot", "--progress-every", "0"]
    multi = subprocess.Popen(_torchrun([*common, "--out", str(tmp_path / "two")]),
                             cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        patch_build(monkeypatch, model_cache)
        code = cli.main([*common, "--out", str(tmp_path / "one")])
    out_multi, err_multi = multi.communicate(timeout=240)
    return SimpleNamespace(tmp=tmp_path, common=common, single=(code, out.getvalue(), err.getvalue()),
                           multi=(multi.returncode, out_multi, err_multi))


@needs_torchrun
def test_torchrun_two_processes_equal_one(runs):
    code, out_single, err_single = runs.single
    assert code == 0, err_single
    code, out_multi, err_multi = runs.multi
    assert code == 0, err_multi
    one = np.load(runs.tmp / "one" / "confusion.npy")
    two = np.load(runs.tmp / "two" / "confusion.npy")
    assert one.sum() == sum(h * w for h, w in SIZES)  # every pixel, once
    assert np.array_equal(one, two)
    assert out_multi == out_single and out_multi.count("copypaste: Task:") == 1  # only rank 0 reports
    results = json.loads((runs.tmp / "two" / "results.json").read_text())
    assert results["config"]["world_size"] == 2 and results["images"]["evaluated"] == 5
    assert "rank 0 of 2" in err_multi  # rank 0's progress lines
    reference = json.loads((runs.tmp / "one" / "results.json").read_text())
    assert results["models"] == reference["models"]


@needs_torchrun
def test_resume_on_two_processes_what_one_process_began(runs, shared_build, monkeypatch):
    """A state saved by one process (it failed after 2 images) is finished by torchrun: the state
    does not depend on the number of processes."""
    from sed_fast.evaluation import runner

    assert runs.single[0] == 0, runs.single[2]
    out = runs.tmp / "resumed"
    real, seen = runner.predict, []

    def failing(model, images):
        if len(seen) == 2:
            raise RuntimeError("stop here")
        seen.extend(images)
        return real(model, images)

    monkeypatch.setattr(runner, "predict", failing)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert cli.main([*runs.common, "--out", str(out)]) == 1
    assert len(torch.load(out / "eval_state.pt", weights_only=True)["finished"]) == 2
    result = subprocess.run(_torchrun([*runs.common, "--out", str(out), "--resume"]), cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert "resuming: 2 of 5 images already evaluated" in result.stderr
    assert np.array_equal(np.load(out / "confusion.npy"), np.load(runs.tmp / "one" / "confusion.npy"))
