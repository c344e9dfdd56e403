"""``sed-fast eval`` end to end on tiny synthetic datasets (random weights, encoder side 64, CPU)."""
import contextlib
import io
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sed_fast.evaluation.datasets as datasets_mod
from eval_synthetic import TINY, make_layout, tiny_registry, write_label
from sed_fast import cli as top_cli
from sed_fast.evaluation import runner
from sed_fast.evaluation.datasets import custom_dataset, read_image, read_label, resolve_dataset
from sed_fast.evaluation.state import STATE_FILE

pytestmark = pytest.mark.filterwarnings("ignore::sed_fast.RandomWeightsWarning")

COMMON = ["--random-weights", "--resolution", "64", "--device", "cpu", "--workers", "0", "--impl", "reference"]


def run_eval(argv):
    """``sed-fast eval ...`` in-process through the top-level command: (code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = top_cli.main(["eval", *[str(a) for a in argv]])
    return code, out.getvalue(), err.getvalue()


def _read(sample):
    return torch.from_numpy(np.ascontiguousarray(read_image(sample.image).transpose(2, 0, 1)))


def expected_confusion(model, samples, num_classes, ignore, background_from=None, batch_size=1):
    """The confusion matrix computed here with NumPy, as detectron2's evaluator, from the model's
    labels of ``batch_size`` images per call (the grouping changes the float order of batched convs)."""
    conf = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    for first in range(0, len(samples), batch_size):
        group = samples[first:first + batch_size]
        for sample, pred in zip(group, runner.predict(model, [_read(s) for s in group])):
            pred = pred.cpu().numpy().astype(int)
            if background_from is not None:
                pred[pred >= background_from] = background_from
            gt = read_label(sample.label)
            gt[gt == ignore] = num_classes
            conf += np.bincount((num_classes + 1) * pred.reshape(-1) + gt.reshape(-1),
                                minlength=conf.size).reshape(conf.shape)
    return conf


def the_model(cache, impl="reference"):
    models = [m for key, m in cache.items() if key[1] == impl]
    assert len(models) == 1
    return models[0]


@pytest.fixture
def tiny_datasets(monkeypatch):
    monkeypatch.setattr(datasets_mod, "DATASETS", tiny_registry())


@pytest.mark.parametrize("name", ["ade150", "ade847", "pc59", "pc459", "voc20", "voc20b", "coco"])
def test_each_layout_end_to_end(tmp_path, shared_build, tiny_datasets, name):
    root = tmp_path / "data"
    stems = make_layout(root, name, count=3)
    out = tmp_path / "out"
    code, stdout, stderr = run_eval([name, "--data-root", root, "--out", out, *COMMON])
    assert code == 0, stderr
    assert "RANDOM WEIGHTS" in stderr and "Traceback" not in stderr
    assert "1 label map(s) have no image" in stderr
    results = json.loads((out / "results.json").read_text())
    assert results["images"] == {"evaluated": 3, "in_dataset": 3, "images_without_label": 1,
                                 "labels_without_image": 1, "skipped_unreadable": 0}
    dataset = resolve_dataset(name, root)
    assert [s.stem for s in dataset.samples] == stems
    conf = np.load(out / "confusion.npy")
    want = expected_confusion(the_model(shared_build), dataset.samples, dataset.num_classes,
                              dataset.spec.ignore_label, dataset.spec.background_from)
    assert np.array_equal(conf, want)
    assert conf[:, -1].sum() > 0  # ignored pixels were counted in the ignore column
    # the copypaste lines, on stdout and in log.txt, match the figures
    summary = results["models"]["reference"]["summary"]
    values = ",".join("{0:.4f}".format(summary[k]) for k in ("mIoU", "fwIoU", "mACC", "pACC"))
    assert stdout.splitlines() == ["copypaste: Task: sem_seg", "copypaste: mIoU,fwIoU,mACC,pACC",
                                   f"copypaste: {values}"]
    log = (out / "log.txt").read_text()
    assert f"INFO: copypaste: {values}" in log
    assert "| class |" in (out / "results.md").read_text()
    assert results["config"]["random_weights"] is True and results["environment"]["versions"]["torch"]
    assert results["dataset"]["ignore_label"] == dataset.spec.ignore_label
    if name == "voc20b":
        assert conf.shape == (3, 3)  # 2 evaluated classes + ignore, from a 3-name vocabulary
    if "matplotlib" in sys.modules or _has_matplotlib():
        assert (out / "per_class_iou.png").is_file()


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.fixture
def custom(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        h, w = (36 + 4 * i, 50 - 2 * i)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"img{i}.png")
        label = rng.integers(0, 3, (h, w))
        label[:3] = 255
        write_label(labels / f"img{i}.png", label, ".png")
    return ["--images", images, "--labels", labels, "--vocab", ",".join(TINY), "--ignore", "255"]


def test_batches_and_workers_give_the_same_matrix(tmp_path, shared_build, custom):
    code, _, err = run_eval([*custom, "--out", tmp_path / "a", *COMMON])
    assert code == 0, err
    code, _, err = run_eval([*custom, "--out", tmp_path / "b", *COMMON, "--batch-size", "4", "--workers", "2",
                             "--limit", "5"])
    assert code == 0, err
    code, _, err = run_eval([*custom, "--out", tmp_path / "c", *COMMON, "--limit", "5"])
    assert code == 0, err
    batched, alone = np.load(tmp_path / "b" / "confusion.npy"), np.load(tmp_path / "c" / "confusion.npy")
    assert json.loads((tmp_path / "b" / "results.json").read_text())["images"]["evaluated"] == 5
    assert not np.array_equal(np.load(tmp_path / "a" / "confusion.npy"), alone)
    # Exact: the loader workers and the batching of the evaluation count exactly the model's labels.
    model = the_model(shared_build)
    samples = custom_dataset(custom[1], custom[3], list(TINY), 255).samples[:5]
    assert np.array_equal(alone, expected_confusion(model, samples, 3, 255))
    assert np.array_equal(batched, expected_confusion(model, samples, 3, 255, batch_size=4))
    assert np.array_equal(batched.sum(0), alone.sum(0))  # the same ground-truth pixels
    # The model in a batch of 4 may differ from each image alone only where two classes tie: a
    # batched conv sums in another order (oneDNN blocks by batch size; cuDNN picks algorithms by
    # it), ~1e-6 apart, which flips an argmax whose top two scores are that close.
    images = [_read(s) for s in samples[:4]]
    for image, labels in zip(images, runner.predict(model, images)):
        scores = model(image[None])[0]
        own = runner.predict(model, [image])[0]
        top2 = scores.topk(2, dim=0).values
        flipped = labels != own
        assert bool(((top2[0] - top2[1])[flipped] <= 1e-5).all()), "batched labels differ beyond a near-tie"
        assert int(flipped.sum()) <= 0.001 * flipped.numel() + 1


class Calls:
    """Counts the images predicted; fails with ``error`` when image number ``fail_at`` comes."""

    def __init__(self, monkeypatch, fail_at=None, error=KeyboardInterrupt):
        self.images = 0
        self.fail_at, self.error = fail_at, error
        real = runner.predict

        def predict(model, images):
            if self.fail_at is not None and self.images + len(images) >= self.fail_at:
                raise self.error("stop here")
            self.images += len(images)
            return real(model, images)

        monkeypatch.setattr(runner, "predict", predict)


@pytest.mark.parametrize("error, code", [(KeyboardInterrupt, 130), (RuntimeError, 1)])
def test_interrupt_then_resume_gives_the_uninterrupted_result(tmp_path, shared_build, custom, monkeypatch,
                                                              error, code):
    full = tmp_path / "full"
    assert run_eval([*custom, "--out", full, *COMMON])[0] == 0
    out = tmp_path / "out"
    args = [*custom, "--out", out, *COMMON, "--save-every", "2"]
    with monkeypatch.context() as m:
        Calls(m, fail_at=4, error=error)
        got, _, err = run_eval(args)
    assert got == code, err
    assert "--resume" in err or error is RuntimeError
    state = torch.load(out / STATE_FILE, weights_only=True)
    # one process saves the 3 finished images when stopped, by an interrupt or an error
    kept = 3
    assert len(state["finished"]) == kept and not state["complete"]
    assert not (out / "results.json").exists()
    with monkeypatch.context() as m:
        calls = Calls(m)
        got, stdout, err = run_eval([*args, "--resume"])
    assert got == 0, err
    assert calls.images == 6 - kept  # nothing recomputed
    assert np.array_equal(np.load(out / "confusion.npy"), np.load(full / "confusion.npy"))
    assert json.loads((out / "results.json").read_text())["timing"]["resumed_images"] == kept
    # resuming a finished evaluation evaluates nothing and gives the same figures
    with monkeypatch.context() as m:
        calls = Calls(m)
        got, again, err = run_eval([*args, "--resume"])
    assert got == 0 and calls.images == 0 and again == stdout


def test_resume_refuses_other_settings_and_corrupt_files(tmp_path, shared_build, custom):
    out = tmp_path / "out"
    assert run_eval([*custom, "--out", out, *COMMON, "--limit", "2"])[0] == 0
    code, _, err = run_eval([*custom, "--out", out, *COMMON, "--limit", "2"])
    assert code == 2 and "--resume" in err and "--overwrite" in err
    code, _, err = run_eval([*custom, "--out", out, *COMMON, "--limit", "2", "--resume", "--cer-topk", "2",
                             "--dtype", "bf16"])
    assert code == 2 and "other settings" in err
    assert "cer_topk: None in the resume file, 2 now" in err and "dtype: 'float32' in the resume file" in err
    code, _, err = run_eval([*custom, "--out", out, *COMMON, "--resume"])  # 6 images now, not 2
    assert code == 2 and "images:" in err
    state = out / STATE_FILE
    state.write_bytes(state.read_bytes()[:100])  # truncated
    code, _, err = run_eval([*custom, "--out", out, *COMMON, "--limit", "2", "--resume"])
    assert code == 2 and "corrupt" in err and str(state) in err and "Traceback" not in err
    state.write_text("garbage")
    code, _, err = run_eval([*custom, "--out", out, *COMMON, "--limit", "2", "--resume"])
    assert code == 2 and "corrupt" in err
    code, _, err = run_eval([*custom, "--out", out, *COMMON, "--limit", "2", "--overwrite"])
    assert code == 0, err


def test_compare_fast_with_reference(tmp_path, shared_build, custom):
    out = tmp_path / "out"
    code, stdout, err = run_eval([*custom, "--out", out, *COMMON[:-2], "--impl", "fast", "--compare", "reference",
                                  "--limit", "3"])
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"fast", "reference"}
    comparison = results["comparison"]
    assert 0 <= comparison["pixel_agreement"] <= 1 and comparison["pixels_compared"] > 0
    from sed_fast.models.fast import SEDFast
    reference = the_model(shared_build)
    fast = SEDFast.from_reference(reference)
    dataset = custom_dataset(custom[1], custom[3], list(TINY), 255)
    samples = dataset.samples[:3]
    agree = total = 0
    for sample in samples:
        image = torch.from_numpy(np.ascontiguousarray(read_image(sample.image).transpose(2, 0, 1)))
        a, b = runner.predict(fast, [image])[0], runner.predict(reference, [image])[0]
        agree += int((a == b).sum())
        total += a.numel()
    assert comparison["pixels_compared"] == total and comparison["pixel_agreement"] == pytest.approx(agree / total)
    for name, model in (("fast", fast), ("reference", reference)):
        want = expected_confusion(model, samples, 3, 255)
        assert np.array_equal(np.load(out / f"confusion_{name}.npy"), want)
    assert stdout.count("copypaste: Task:") == 2 and "copypaste: Task: sem_seg[reference]" in stdout


class ZeroModel:
    """Labels every pixel 0, instantly: for the loop's bookkeeping alone."""

    def predict_labels(self, images):
        return [torch.zeros(image.shape[1:], dtype=torch.int64) for image in images]


def test_periodic_saves(tmp_path, custom):
    """The state on disk after each batch: saved every --save-every images, whole batches only."""
    from sed_fast.evaluation.distributed import Context
    from sed_fast.evaluation.state import load_state

    dataset = custom_dataset(custom[1], custom[3], list(TINY), 255)
    state = runner.new_state({"num_classes": 3}, ["model"], 3)
    path = tmp_path / STATE_FILE
    saved = []
    runner.evaluate({"model": ZeroModel()}, dataset, state, ctx=Context(), device=torch.device("cpu"),
                    state_file=path, batch_size=2, save_every=3, progress=False,
                    on_batch=lambda done: saved.append((done, len(load_state(path).finished) if path.exists() else 0)))
    # step = 3 rounded up to whole batches of 2 = 4: saves after images 4 and 6 (the end)
    assert saved == [(2, 0), (4, 0), (6, 4)]
    final = load_state(path)
    assert final.complete and len(final.finished) == 6
    pixels = sum(Image.open(s.label).size[0] * Image.open(s.label).size[1] for s in dataset.samples)
    assert int(final.confusion["model"][0].sum()) == pixels  # every pixel predicted 0, counted once


def test_usage_errors(tmp_path, custom):
    code, _, err = run_eval([*custom, "--out", tmp_path / "o", "--device", "cpu"])
    assert code == 2 and "--checkpoint" in err and "--random-weights" in err
    code, _, err = run_eval(["ade150", "--data-root", tmp_path / "none", "--out", tmp_path / "o", *COMMON])
    assert code == 2 and "data root not found" in err
    code, _, err = run_eval(["--out", tmp_path / "o", *COMMON])
    assert code == 2 and "no dataset" in err
    code, _, err = run_eval([*custom, "--out", tmp_path / "o", *COMMON, "--impl", "reference", "--compare",
                             "reference"])
    assert code == 2 and "--impl fast" in err
    code, _, err = run_eval([*custom, "--out", tmp_path / "o", *COMMON, "--batch-size", "0"])
    assert code == 2 and "--batch-size" in err
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    code, _, err = run_eval([*custom, "--out", tmp_path / "o", "--checkpoint", bad, *COMMON[1:]])
    assert code == 2 and "bad.pth" in err and "Traceback" not in err
    code, _, err = run_eval([*custom, "--out", tmp_path / "o", "--checkpoint", tmp_path / "none.pth", *COMMON[1:]])
    assert code == 2 and "not found" in err
    code, out, _ = run_eval(["--help"])
    assert code == 0 and "--legacy-miou" in out and "torchrun" in out


def test_invalid_labels_and_all_ignore(tmp_path, shared_build):
    images, labels = tmp_path / "i", tmp_path / "l"
    images.mkdir()
    labels.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(images / "a.jpg")
    label = np.full((40, 40), 255)
    label[0, 0] = 7
    write_label(labels / "a.png", label, ".png")
    args = ["--images", images, "--labels", labels, "--vocab", ",".join(TINY), "--ignore", "255", *COMMON]
    code, _, err = run_eval([*args, "--out", tmp_path / "o1"])
    assert code == 2 and "a.png" in err and "label values 7" in err and "Traceback" not in err  # bad input
    assert "--invalid-labels ignore" in err and "--resume" not in err
    code, _, err = run_eval([*args, "--out", tmp_path / "o2", "--invalid-labels", "ignore"])
    assert code == 1 and "no labelled pixel" in err  # all pixels ignored: metrics undefined, said so
    results = json.loads((tmp_path / "o2" / "results.json").read_text())
    assert results["invalid_label_pixels"] == 1 and results["models"]["reference"]["summary"]["mIoU"] is None


def test_plot_many_classes_and_without_matplotlib(tmp_path, monkeypatch):
    from sed_fast.evaluation.report import plot_per_class_iou

    rows = [{"index": i, "name": f"class {i}, synonym", "iou": float(i % 97), "acc": 0.0} for i in range(120)]
    rows.append({"index": 120, "name": "absent", "iou": None, "acc": None})
    pytest.importorskip("matplotlib", reason="matplotlib is an optional extra: the plot is skipped without it")
    assert plot_per_class_iou(rows, tmp_path / "p.png", "title") is None
    with Image.open(tmp_path / "p.png") as image:
        assert image.width > 800 and image.height > 300
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    message = plot_per_class_iou(rows, tmp_path / "q.png", "title")
    assert "matplotlib is not installed" in message and not (tmp_path / "q.png").exists()


def test_progress_lines_without_a_terminal():
    stream = io.StringIO()
    progress = runner.Progress(4, enabled=True, interval=0.0, stream=stream)
    for _ in range(4):
        progress.update(1)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("sed-fast eval: 4/4 images (100.0%)")
    assert "images/s" in lines[0] and "ETA" in lines[0]


def test_users_files_in_out_are_left_alone(tmp_path, shared_build, custom):
    """The --out rule: a user's model_final.pth and an unrelated file in --out stay byte-identical."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "model_final.pth").write_bytes(b"the user's weights")
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = run_eval([*custom, "--out", out, *COMMON])
    assert code == 0, err
    assert {name: (out / name).read_bytes() for name in before} == before
