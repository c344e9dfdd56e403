"""``sed-fast train`` and the ``--out`` rule: it deletes or overwrites only files a training run
provably wrote. A user's ``model_final.pth`` in ``--out`` (also when it is the ``--checkpoint`` to
fine-tune from) and any other file of theirs stay byte-identical; ``--resume`` with nothing to
resume is a usage error that deletes nothing."""
import hashlib

from train_synthetic import CLASSES, tiny_build, write_dataset
from sed_fast.training import cli as train_cli


def _args(images, labels, out, *extra, weights=("--random-weights",)):
    return ["--images", str(images), "--labels", str(labels), "--vocab", ",".join(CLASSES), "--ignore", "255",
            *weights, "--resolution", "64", "--crop-size", "32", "--min-size-train", "40",
            "--size-divisibility", "32", "--impl", "reference", "--device", "cpu", "--workers", "0",
            "--progress-every", "0", "--no-plot", "--quiet", "--out", str(out), "--max-iter", "1",
            "--ims-per-batch", "1", *extra]


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def test_fresh_run_with_a_checkpoint_inside_out_leaves_the_users_files_alone(tmp_path, monkeypatch, capsys):
    tiny_build(monkeypatch)
    images, labels = write_dataset(tmp_path / "data", count=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model_final.pth").write_bytes(b"the user's official weights")
    (out / "notes.txt").write_text("mine")
    before = _digests(out)
    code = train_cli.main(_args(images, labels, out, weights=("--checkpoint", str(out / "model_final.pth"))))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "model_final.pth" in err and "did not write" in err
    assert _digests(out) == before  # nothing deleted, nothing written over


def test_resume_with_nothing_to_resume_is_a_usage_error_that_deletes_nothing(tmp_path, monkeypatch, capsys):
    tiny_build(monkeypatch)
    images, labels = write_dataset(tmp_path / "data", count=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model_0000999.pth").write_bytes(b"a user's checkpoint")
    (out / "notes.txt").write_text("mine")
    before = _digests(out)
    assert train_cli.main(_args(images, labels, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "nothing was changed" in err
    assert _digests(out) == before
    empty = tmp_path / "empty"
    assert train_cli.main(_args(images, labels, empty, "--resume")) == 2
    assert not empty.exists() or [p.name for p in empty.iterdir()] == []


def test_overwrite_removes_the_runs_files_only(tmp_path, monkeypatch, capsys):
    tiny_build(monkeypatch)
    images, labels = write_dataset(tmp_path / "data", count=2)
    out = tmp_path / "out"
    assert train_cli.main(_args(images, labels, out)) == 0
    assert (out / "model_final.pth").exists() and (out / "last_checkpoint").exists()
    (out / "notes.txt").write_text("mine")
    (out / "model_user.pth").write_bytes(b"a user's weights")
    mine = {name: digest for name, digest in _digests(out).items() if name in ("notes.txt", "model_user.pth")}
    assert train_cli.main(_args(images, labels, out)) == 2  # a run is there: --resume or --overwrite
    assert train_cli.main(_args(images, labels, out, "--overwrite")) == 0, capsys.readouterr().err
    after = _digests(out)
    assert {name: after[name] for name in mine} == mine
    assert (out / "model_final.pth").exists()


def test_a_users_file_named_as_a_checkpoint_stops_overwrite_untouched(tmp_path, monkeypatch, capsys):
    """A file under a checkpoint's name but without a training state beside it is not the run's."""
    tiny_build(monkeypatch)
    images, labels = write_dataset(tmp_path / "data", count=2)
    out = tmp_path / "out"
    assert train_cli.main(_args(images, labels, out)) == 0
    (out / "model_0000000.pth").write_bytes(b"a user's weights")
    before = _digests(out)
    assert train_cli.main(_args(images, labels, out, "--overwrite")) == 2
    assert "model_0000000.pth" in capsys.readouterr().err
    assert _digests(out) == before  # refused before anything was deleted


def test_a_signal_during_the_last_iteration_finishes_the_run_with_exit_0(tmp_path, monkeypatch, capsys):
    """The stop request is honoured after the iteration, whose checkpoint is then model_final.pth:
    the run finished, so it says so and exits 0, never "interrupted" with a --resume to do."""
    import os
    import signal

    tiny_build(monkeypatch)
    build = train_cli._build_model

    def build_and_signal_on_the_last_iteration(*args, **kwargs):
        model = build(*args, **kwargs)
        losses, calls = model.losses, []

        def losses_then_sigterm(*a, **k):
            calls.append(1)
            if len(calls) == 2:  # --max-iter 2
                os.kill(os.getpid(), signal.SIGTERM)
            return losses(*a, **k)

        model.losses = losses_then_sigterm
        return model

    monkeypatch.setattr(train_cli, "_build_model", build_and_signal_on_the_last_iteration)
    images, labels = write_dataset(tmp_path / "data", count=2)
    out = tmp_path / "out"
    args = _args(images, labels, out)
    args[args.index("--max-iter") + 1] = "2"
    code = train_cli.main(args)
    err = capsys.readouterr().err
    assert code == 0, err
    assert "finished" in err and "--resume" not in err
    assert (out / "model_final.pth").exists()
