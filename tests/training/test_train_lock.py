"""``sed-fast train`` holds --out like eval and segment: a second run into a held folder exits 2
naming the holder's PID before any model is built; a killed holder's lock is taken over, noted."""
import contextlib
import subprocess
import sys
import textwrap

from train_synthetic import CLASSES, tiny_build, write_dataset
from sed_fast.toolkit import outdir_lock
from sed_fast.training import cli as train_cli

# Holds a folder's lock in another process until its stdin closes (the lock module alone: no torch).
_HOLDER = textwrap.dedent("""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("outdir_lock", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with module.exclusive_output_dir(sys.argv[2], "the test's holder"):
        print("locked", flush=True)
        sys.stdin.readline()
""")


@contextlib.contextmanager
def holding(folder):
    child = subprocess.Popen([sys.executable, "-c", _HOLDER, outdir_lock.__file__, str(folder)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.strip() == "locked", child.stderr.read()
        yield child
    finally:
        if child.poll() is None:
            child.stdin.close()
            child.wait(timeout=60)


def _args(images, labels, out, *extra):
    return ["--images", str(images), "--labels", str(labels), "--vocab", ",".join(CLASSES), "--ignore", "255",
            "--random-weights", "--resolution", "64", "--crop-size", "32", "--min-size-train", "40",
            "--size-divisibility", "32", "--impl", "reference", "--device", "cpu", "--workers", "0",
            "--progress-every", "0", "--no-plot", "--out", str(out), "--max-iter", "1", "--ims-per-batch", "1",
            *extra]


def test_a_held_out_folder_is_refused_naming_the_holder_before_a_model_is_built(tmp_path, monkeypatch, capsys):
    images, labels = write_dataset(tmp_path / "data", count=2)
    built = []
    monkeypatch.setattr(train_cli, "_build_model", lambda *a: built.append(a))
    out = tmp_path / "out"
    with holding(out) as child:
        assert train_cli.main(_args(images, labels, out, "--quiet")) == 2
        message = capsys.readouterr().err
        assert f"PID {child.pid}" in message and "--out" in message
        assert not built
        assert outdir_lock.holder(out)["pid"] == child.pid  # the holder's lock is left alone
        assert not (out / "log.txt").exists()
    assert child.returncode == 0


def test_a_killed_holders_lock_is_taken_over_and_released_at_the_end(tmp_path, monkeypatch, capsys):
    tiny_build(monkeypatch)
    images, labels = write_dataset(tmp_path / "data", count=2)
    out = tmp_path / "out"
    with holding(out) as child:
        child.kill()  # SIGKILL: the lock file stays, the kernel drops the flock
        child.wait(timeout=60)
    assert outdir_lock.holder(out)["held"] is False
    assert train_cli.main(_args(images, labels, out)) == 0
    assert f"left by PID {child.pid}" in capsys.readouterr().err
    assert f"left by PID {child.pid}" in (out / "log.txt").read_text()
    assert (out / "model_final.pth").exists()
    assert not (out / outdir_lock.LOCK_NAME).exists()  # released by the run that ended
