"""``sed-fast train``: the tool's machinery on a tiny trainable stand-in for SED (instant steps),
and one short run of the real SED-B (random weights, --resolution 64, three classes) for the
official checkpoint and the parameter groups.

The tiny runs: an uninterrupted run is the yardstick (its loss falls); a run resumed from its
periodic checkpoint ends with the same weights bit for bit, and so does a run stopped by SIGTERM and
resumed (drop path on: the RNG states are restored); a two-process gloo run takes the same steps
as one process with the whole batch.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train_synthetic import CLASSES, TinySED, cached_build, tiny_build, write_dataset
from sed_fast.training import cli as train_cli
from sed_fast.training.augment import (AugmentConfig, augment, bgr_to_hsv, hsv_to_bgr, pad_to_divisibility,
                                       resize_shortest_edge_shape, sample_rngs)
from sed_fast.training.data import DataOrder, rank_positions
from sed_fast.training.optim import lr_factor

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def _common(images, labels, out, *extra):
    return ["--images", str(images), "--labels", str(labels), "--vocab", ",".join(CLASSES), "--ignore", "255",
            "--random-weights", "--resolution", "64", "--crop-size", "32", "--min-size-train", "40",
            "--size-divisibility", "32", "--impl", "reference", "--device", "cpu", "--workers", "0",
            "--progress-every", "0", "--no-plot", "--quiet", "--out", str(out), *extra]


# The yardstick (tiny model): 90 iterations, a checkpoint every 30.
RUN = ["--max-iter", "90", "--ims-per-batch", "2", "--save-every", "30", "--base-lr", "1e-2",
       "--clip-multiplier", "1", "--clip-value", "1"]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    return write_dataset(root, count=4)


@pytest.fixture
def tiny(monkeypatch):
    tiny_build(monkeypatch)


@pytest.fixture(scope="module")
def yardstick(tmp_path_factory, data):
    mp = pytest.MonkeyPatch()
    try:
        tiny_build(mp)
        out = tmp_path_factory.mktemp("yardstick") / "out"
        assert train_cli.main(_common(*data, out, *RUN)) == 0
    finally:
        mp.undo()  # now: the tests after it build what they ask for
    return out


# -- augmentation and data order (no model) ---------------------------------------------------------
def test_resize_shape_follows_detectron2():
    assert resize_shortest_edge_shape(480, 640, 768, 2666) == (768, 1024)
    assert resize_shortest_edge_shape(100, 1000, 768, 2666) == (267, 2666)  # the long side capped
    assert resize_shortest_edge_shape(641, 427, 768, 2666) == (1153, 768)


def test_augment_is_a_function_of_seed_and_position():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    label = rng.integers(0, 3, (50, 70))
    label[:5] = 255
    config = AugmentConfig(min_size_train=(60,), crop_size=(40, 40), size_divisibility=32)
    a = augment(image, label, config, 255, *sample_rngs(1, 7))
    b = augment(image, label, config, 255, *sample_rngs(1, 7))
    c = augment(image, label, config, 255, *sample_rngs(1, 8))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[0].shape == (40, 40, 3) and a[1].shape == (40, 40)
    assert not (np.array_equal(a[0], c[0]) and np.array_equal(a[1], c[1]))
    assert set(np.unique(a[1])) <= {0, 1, 2, 255}  # nearest: no new label values
    img, lab = pad_to_divisibility(torch.from_numpy(a[0].transpose(2, 0, 1).copy()), torch.from_numpy(a[1]), 32, 255)
    assert tuple(lab.shape) == (64, 64) and (lab[40:] == 255).all() and (img[:, :, 40:] == 128).all()


def test_category_area_constraint_avoids_single_class_crops():
    label = np.zeros((40, 40), dtype=np.int64)
    label[:, 30:] = 1  # most 20x20 windows hold class 0 alone
    config = AugmentConfig(min_size_train=(0,), crop_size=(20, 20), single_category_max_area=0.9,
                           color_aug_ssd=False, flip=False, size_divisibility=0)
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    mixed = 0
    for position in range(20):
        _, crop = augment(image, label, config, 255, *sample_rngs(0, position))
        counts = np.bincount(crop.ravel(), minlength=2)
        mixed += int(counts.max() < 0.9 * counts.sum())
    assert mixed >= 15  # 10 tries per sample: almost always a window with both classes


def test_hsv_round_trip_and_known_values():
    # OpenCV's 8-bit HSV: pure red, green, blue, grey.
    bgr = np.array([[[0, 0, 255], [0, 255, 0], [255, 0, 0], [128, 128, 128]]], dtype=np.uint8)
    assert bgr_to_hsv(bgr).tolist() == [[[0, 255, 255], [60, 255, 255], [120, 255, 255], [0, 0, 128]]]
    rng = np.random.default_rng(1)
    colours = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    back = hsv_to_bgr(bgr_to_hsv(colours)).astype(int)
    assert np.abs(back - colours).max() <= 8  # H has 180 steps: a round trip is close, not exact


def test_data_order_is_detectron2s_and_splits_the_global_batch():
    order = DataOrder(5, seed=3)
    generator = torch.Generator()
    generator.manual_seed(3)
    expected = torch.randperm(5, generator=generator).tolist() + torch.randperm(5, generator=generator).tolist()
    assert [order(p) for p in range(10)] == expected
    for iteration in range(3):
        whole = rank_positions(iteration, 4, 0, 1)
        parts = rank_positions(iteration, 2, 0, 2) + rank_positions(iteration, 2, 1, 2)
        assert sorted(parts) == whole


def test_loss_curve_png(tmp_path):
    from sed_fast.training.plot import _pil_curve, loss_curve

    history = [{"iteration": i, "total_loss": 2.0 / (1 + i), "loss_sem_seg_0": 1.0 / (1 + i)} for i in range(30)]
    loss_curve(history, tmp_path / "curve.png")  # matplotlib when installed, else the PIL drawing
    _pil_curve([r["iteration"] for r in history], [r["total_loss"] for r in history], tmp_path / "pil.png")
    for name in ("curve.png", "pil.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.size[0] >= 400


def test_cosine_schedule_without_warmup():
    assert lr_factor(0, 100) == 1.0
    assert abs(lr_factor(50, 100) - 0.5) < 1e-12
    assert lr_factor(100, 100) < 1e-12


# -- bad input: clear errors before the first iteration -----------------------------------------------
def test_label_outside_vocabulary_is_refused(tmp_path, capsys):
    images, labels = write_dataset(tmp_path, count=2)
    Image.fromarray(np.full((48, 64), 7, dtype=np.uint8), mode="L").save(labels / "img01.png")
    assert train_cli.main(_common(images, labels, tmp_path / "out", "--max-iter", "1")) == 2
    message = capsys.readouterr().err
    assert "img01.png" in message and "label values 7" in message


def test_mismatched_sizes_and_empty_sets_are_refused(tmp_path, capsys):
    images, labels = write_dataset(tmp_path, count=2)
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8), mode="L").save(labels / "img00.png")
    assert train_cli.main(_common(images, labels, tmp_path / "out", "--max-iter", "1")) == 2
    assert "img00" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train_cli.main(_common(empty, labels, tmp_path / "out2", "--max-iter", "1")) == 2
    assert "no image files" in capsys.readouterr().err
    assert train_cli.main(_common(images, labels, tmp_path / "out3", "--ims-per-batch", "0")) == 2


def test_non_finite_loss_stops_naming_the_iteration(tmp_path, data, tiny, monkeypatch, capsys):
    from sed_fast.training import loop

    calls = []
    real = loop._compute_losses

    def poisoned(model, images, labels, ignore_value):
        losses = real(model, images, labels, ignore_value)
        calls.append(1)
        if len(calls) == 2:
            losses["loss_sem_seg_2"] = losses["loss_sem_seg_2"] * float("nan")
        return losses

    monkeypatch.setattr(loop, "_compute_losses", poisoned)
    out = tmp_path / "out"
    assert train_cli.main(_common(*data, out, "--max-iter", "3", "--ims-per-batch", "1", "--save-every", "1")) == 1
    message = capsys.readouterr().err
    assert "iteration 1: non-finite loss" in message and "loss_sem_seg_2=nan" in message
    assert "model_0000000.pth, after 1 of 3 iterations" in message  # the last good checkpoint is named
    assert "--resume to run iterations 2-3" in message  # with what --resume would do
    assert not (out / "model_0000001.pth").exists() and not (out / "model_final.pth").exists()
    good = _weights(out / "model_0000000.pth")["model"]
    assert all(torch.isfinite(v).all() for v in good.values())


# -- the yardstick run ---------------------------------------------------------------------------------
def test_loss_falls_and_outputs_are_written(yardstick):
    records = [json.loads(line) for line in (yardstick / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(90))
    for key in ("loss_sem_seg_0", "loss_sem_seg_3", "total_loss", "lr", "grad_norm", "time", "data_time",
                "peak_memory_mb"):
        assert all(key in r for r in records), key
    first = np.mean([r["total_loss"] for r in records[:10]])
    last = np.mean([r["total_loss"] for r in records[-10:]])
    assert last < 0.7 * first, (first, last)
    assert records[0]["lr"] == pytest.approx(1e-2) and records[45]["lr"] == pytest.approx(5e-3)
    assert "iter 90/90" in (yardstick / "log.txt").read_text()
    assert (yardstick / "last_checkpoint").read_text().strip() == "model_final.pth"
    saved = _weights(yardstick / "model_final.pth")
    assert set(saved) == {"model", "iteration"} and saved["iteration"] == 89  # weights only
    assert _weights(yardstick / "model_0000059.pth")["iteration"] == 59
    # --keep-last 2 (the default): the two newest checkpoints; one state, the final one, without optimizer.
    # (.sed_fast_outputs.json: the --out ownership claim; run.json: the run record)
    assert sorted(p.name for p in yardstick.iterdir()) == [".sed_fast_outputs.json", "last_checkpoint", "log.txt",
                                                           "metrics.jsonl", "model_0000059.pth", "model_final.pth",
                                                           "model_final.pth.state.pt", "run.json"]
    state = _weights(yardstick / "model_final.pth.state.pt")
    assert state["finished"] and state["checkpoints"] == ["model_0000059.pth", "model_final.pth"]
    assert not {"optimizer", "rng", "scaler"} & set(state)


def _stop_after(monkeypatch, iterations, signum=signal.SIGINT):
    """Send this process ``signum`` during iteration ``iterations`` (counted from 1): the run saves and stops."""
    from sed_fast.training import loop

    calls = []
    real = loop._compute_losses

    def counting(model, images, labels, ignore_value):
        calls.append(1)
        if len(calls) == iterations:
            os.kill(os.getpid(), signum)
        return real(model, images, labels, ignore_value)

    monkeypatch.setattr(loop, "_compute_losses", counting)
    return monkeypatch


def test_resume_from_a_periodic_checkpoint_is_bit_for_bit(yardstick, tmp_path, data, tiny, monkeypatch, capsys):
    out = tmp_path / "out"
    _stop_after(monkeypatch, 45)
    assert train_cli.main(_common(*data, out, *RUN, "--keep-last", "1")) == 128 + signal.SIGINT
    message = capsys.readouterr().err
    assert "stopped by SIGINT after 45 of 90 iterations" in message
    assert "--resume to run iterations 46-90 (45 left)" in message
    # --keep-last 1: the checkpoint of the stop and its state, nothing older.
    assert sorted(p.name for p in out.glob("model_*")) == ["model_0000044.pth", "model_0000044.pth.state.pt"]
    monkeypatch.undo()
    tiny_build(monkeypatch)
    assert train_cli.main(_common(*data, out, *RUN, "--keep-last", "1", "--resume")) == 0
    assert _same(_weights(yardstick / "model_final.pth")["model"], _weights(out / "model_final.pth")["model"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(90))  # the lines after the state are redone once
    assert sorted(p.name for p in out.glob("model_*")) == ["model_final.pth", "model_final.pth.state.pt"]


def test_a_signal_in_the_last_iteration_finishes_the_run(yardstick, tmp_path, data, tiny, monkeypatch, capsys):
    out = tmp_path / "out"
    args = _common(*data, out, "--max-iter", "3", "--ims-per-batch", "1", "--save-every", "0")
    _stop_after(monkeypatch, 3)
    assert train_cli.main(args) == 0
    message = capsys.readouterr().err
    assert "the run finished before SIGINT took effect: model_final.pth is complete" in message
    assert "--resume" not in message
    assert "SIGINT came during the last iteration, after which the final checkpoint was written" in \
        (out / "log.txt").read_text()
    assert _weights(out / "model_final.pth")["iteration"] == 2
    monkeypatch.undo()
    tiny_build(monkeypatch)
    assert train_cli.main(args + ["--resume"]) == 0  # nothing to do, and it says so
    assert "finished (3 iterations): nothing to resume" in capsys.readouterr().err


def test_resume_refuses_other_settings_naming_them(yardstick, tmp_path, data, tiny, capsys):
    out = tmp_path / "out"
    shutil.copytree(yardstick, out)
    changed = [a if a != "1e-2" else "1e-3" for a in RUN] + ["--no-flip"]
    assert train_cli.main(_common(*data, out, *changed, "--resume")) == 2
    message = capsys.readouterr().err
    assert "base_lr: 0.01 in the resume file, 0.001 now" in message and "flip: True" in message
    assert train_cli.main(_common(*data, out, *RUN)) == 2  # neither --resume nor --overwrite
    assert "--resume" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM to a child process is POSIX")
def test_sigterm_saves_a_resumable_state(yardstick, tmp_path, data, tiny, capsys):
    out = tmp_path / "out"
    args = _common(*data, out, *RUN)
    args.remove("--quiet")
    child = subprocess.Popen([sys.executable, str(HERE / "run_train.py"), *args], cwd=ROOT, env=_env(),
                             stderr=subprocess.PIPE, text=True)
    seen = []
    for line in child.stderr:
        seen.append(line)
        if "iter 1/90" in line:
            child.send_signal(signal.SIGTERM)
            break
    rest = child.stderr.read()
    child.wait(timeout=300)
    seen.append(rest)
    assert child.returncode == 128 + signal.SIGTERM, "".join(seen)[-3000:]
    assert "--resume" in rest
    name = (out / "last_checkpoint").read_text().strip()
    stopped_at = _weights(out / name)["iteration"]
    assert 0 <= stopped_at < 89 and (out / (name + ".state.pt")).exists()
    assert not list(out.glob(".*.tmp"))  # no half-written file
    capsys.readouterr()
    assert train_cli.main(args + ["--resume"]) == 0  # in this process: the same single thread
    assert f"resuming from {name} after {stopped_at + 1} iterations" in capsys.readouterr().err
    assert _same(_weights(yardstick / "model_final.pth")["model"], _weights(out / "model_final.pth")["model"])


def test_two_gloo_processes_take_the_steps_of_one(tmp_path, data, tiny):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("no gloo backend in this PyTorch build")
    # A few small steps: Adam's update of an element whose gradient is ~0 is +-lr whatever its
    # rounding, so long runs at a large lr drift apart by chaos, not by a different computation.
    dist_args = ["--max-iter", "3", "--ims-per-batch", "4", "--save-every", "0", "--drop-path", "0",
                 "--base-lr", "1e-3", "--clip-multiplier", "1"]
    one = tmp_path / "one"
    assert train_cli.main(_common(*data, one, *dist_args)) == 0
    two = tmp_path / "two"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(HERE / "run_train.py"), *_common(*data, two, *dist_args)], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = _weights(one / "model_final.pth")["model"], _weights(two / "model_final.pth")["model"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        initial = TinySED(len(CLASSES)).state_dict()
    moved = max((a[k] - initial[k]).abs().max().item() for k in a)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-3 and worst <= 1e-6, (moved, worst)
    lines_one = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    lines_two = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert len(lines_one) == len(lines_two) == 3
    for x, y in zip(lines_one, lines_two):
        assert x["total_loss"] == pytest.approx(y["total_loss"], rel=1e-5, abs=1e-7)


def test_loader_workers_and_bf16_autocast(tmp_path, data, tiny):
    args = ["--max-iter", "4", "--ims-per-batch", "2", "--save-every", "0"]
    assert train_cli.main(_common(*data, tmp_path / "w0", *args)) == 0
    assert train_cli.main(_common(*data, tmp_path / "w2", *args, "--workers", "2")) == 0  # the last --workers wins
    # The data (order and augmentation) do not depend on the loader workers.
    assert _same(_weights(tmp_path / "w0" / "model_final.pth")["model"],
                 _weights(tmp_path / "w2" / "model_final.pth")["model"])
    assert train_cli.main(_common(*data, tmp_path / "bf16", *args, "--dtype", "bf16")) == 0
    weights = _weights(tmp_path / "bf16" / "model_final.pth")["model"]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())


def test_evaluation_during_training_joins_the_metrics_and_leaves_the_steps_alone(tmp_path, data, tiny):
    images, labels = data
    args = ["--max-iter", "10", "--ims-per-batch", "2", "--save-every", "0", "--base-lr", "1e-2"]
    plain = tmp_path / "plain"
    assert train_cli.main(_common(*data, plain, *args)) == 0
    evaluated = tmp_path / "evaluated"
    assert train_cli.main(_common(*data, evaluated, *args, "--eval-every", "5", "--eval-images", str(images),
                                  "--eval-labels", str(labels), "--eval-vocab", ",".join(CLASSES),
                                  "--eval-ignore", "255")) == 0
    records = [json.loads(x) for x in (evaluated / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "eval/mIoU" in r] == [4, 9]
    assert all(0.0 <= records[i]["eval/mIoU"] <= 100.0 for i in (4, 9))
    # Drop path is on: the evaluation must not move the training's random streams.
    assert _same(_weights(plain / "model_final.pth")["model"], _weights(evaluated / "model_final.pth")["model"])


# -- the real SED-B ------------------------------------------------------------------------------------
def test_real_model_checkpoint_is_official_and_loads_strictly(tmp_path, data, monkeypatch):
    """One iteration of SED-B (random weights, the official losses): the checkpoint has exactly the
    official keys and shapes and loads strictly through build_sed; the parameter groups follow the
    official rules."""
    from sed_fast.api import build_sed
    from sed_fast.data.checkpoint import official_shapes
    from sed_fast.training.optim import SolverConfig, param_groups

    cached_build(monkeypatch)
    out = tmp_path / "out"
    assert train_cli.main(_common(*data, out, "--max-iter", "1", "--ims-per-batch", "1", "--save-every", "0")) == 0
    saved = _weights(out / "model_final.pth")
    assert set(saved) == {"model", "iteration"} and saved["iteration"] == 0
    official = official_shapes()["sed-b"]
    assert set(saved["model"]) == set(official)
    assert all(list(saved["model"][k].shape) == list(shape) for k, shape in official.items())
    model = build_sed("b", impl="reference", checkpoint=out / "model_final.pth", device="cpu", clip_resolution=64)
    state = model.state_dict()
    assert all(torch.equal(state[k], saved["model"][k]) for k in saved["model"])
    # A finished run keeps no optimizer state: the final state file is a few kB, not the size of the weights.
    assert sorted(p.name for p in out.glob("model_*")) == ["model_final.pth", "model_final.pth.state.pt"]
    assert (out / "model_final.pth.state.pt").stat().st_size < 100_000

    model.train()
    groups = param_groups(model, SolverConfig())
    where = {name: (g["lr"], g["weight_decay"]) for g in groups for name in g["names"]}
    prefix = "sem_seg_head.predictor."
    assert where[prefix + "transformer.decoder1.cnext.norm.weight"] == (2e-4, 1e-4)  # official: not a norm type
    assert where[prefix + "transformer.decoder1.attention.norm1.weight"] == (2e-4, 0.0)
    visual_norms = [n for n in where if n.startswith(prefix + "clip_model.visual") and ".norm." in n]
    assert visual_norms and all(where[n][0] == pytest.approx(2e-6) and where[n][1] == 0.0 for n in visual_norms)
    visual_convs = [n for n in where if n.startswith(prefix + "clip_model.visual") and "conv_dw.weight" in n]
    assert visual_convs and all(where[n][1] == 1e-4 for n in visual_convs)
    assert all(p.requires_grad for g in groups for p in g["params"])


def test_colour_label_maps_through_a_palette(tmp_path, tiny, capsys):
    """Colour-coded label maps are read as ``sed-fast eval`` reads them (--label-palette)."""
    images, labels = write_dataset(tmp_path, count=2)
    colours = {0: (10, 10, 200), 1: (10, 200, 10), 2: (200, 10, 10), 255: (0, 0, 0)}
    for path in labels.glob("*.png"):
        index = np.array(Image.open(path))
        rgb = np.zeros(index.shape + (3,), dtype=np.uint8)
        for value, colour in colours.items():
            rgb[index == value] = colour
        Image.fromarray(rgb).save(path)
    palette = tmp_path / "palette.txt"
    palette.write_text("10 10 200 sky\n10 200 10 grass\n200 10 10 road\nignore 0 0 0\n")
    args = _common(images, labels, tmp_path / "out", "--max-iter", "2", "--ims-per-batch", "1", "--save-every", "0")
    assert train_cli.main(args) == 2  # without the palette: refused before the first iteration
    assert "--label-palette" in capsys.readouterr().err
    assert train_cli.main(args + ["--label-palette", str(palette)]) == 0
