"""Faults at chosen points of a command, for tests/test_fault_suite.py.

``install(fault, point, n, out)`` makes the ``n``-th event of kind ``point`` deliver ``fault``:

* points: ``model`` (the n-th call of the model: a forward or a training step) and ``write`` (the
  n-th temporary file the write layer, :mod:`sed_fast.base.files`, creates in ``out``: an output
  file about to be written);
* faults: ``SIGINT``, ``SIGTERM``, ``SIGKILL`` (sent by the process to itself, so the point is
  exact) and ``ENOSPC`` (at ``write``: the file's data goes to ``/dev/full``, so writing it fails for
  lack of space, as on a full disk).

The models are stand-ins whose output depends on the input alone (an interrupted and resumed run
gives the uninterrupted run's files): :class:`SeededFake` for segment, video and eval, the
training tests' TinySED for train. Run as a script (``python fault_driver.py FAULT POINT N OUT
COMMAND ARGS...``) it installs the fault and runs ``sed-fast COMMAND ARGS...`` in that process.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "training"))

from fake_model import FakeModel  # noqa: E402


#: The models built in this process (a command refused before its model is built leaves it empty).
BUILDS = []


class SeededFake(FakeModel):
    """Scores that depend on the image only; each call is a ``model`` event."""

    events = None  # set by install

    def __call__(self, images):
        if SeededFake.events is not None:
            SeededFake.events("model")
        from sed_fast.inputs.images import as_image_list

        as_image_list(images)  # the model's own input checks
        out = []
        for image in images:
            generator = torch.Generator().manual_seed(int(image.to(torch.int64).sum()) % 2**31)  # exact: any threads
            out.append(torch.rand(len(self.class_names), *image.shape[-2:], generator=generator))
        return out


def use_stand_ins(patch=setattr) -> None:
    """segment, video and eval build :class:`SeededFake`; train builds TinySED (seeded by --seed).
    ``patch(owner, name, value)``: how to replace an attribute (a test's ``monkeypatch.setattr``)."""
    import sed_fast.api
    import train_synthetic
    from sed_fast.training import cli as train_cli

    def build_sed(variant, **kwargs):
        BUILDS.append(variant)
        return SeededFake()

    patch(sed_fast.api, "build_sed", build_sed)
    build = train_synthetic.tiny_builder()

    def counted(*args, **kwargs):
        BUILDS.append("train")
        model = build(*args, **kwargs)
        losses = model.losses

        def step(*inputs, **options):  # one training iteration
            if SeededFake.events is not None:
                SeededFake.events("model")
            return losses(*inputs, **options)

        model.losses = step
        return model

    patch(train_cli, "_build_model", counted)


def install(fault: str, point: str, n: int, out: Path, patch=setattr) -> dict:
    """Deliver ``fault`` at the ``n``-th ``point`` event (see the module's text); returns the
    counts of the events so far ({"model": calls, "write": writes}; ``n`` 0: count only)."""
    import sed_fast.base.files as files

    out = Path(out).resolve()
    counts = {"model": 0, "write": 0}

    def event(kind: str):
        counts[kind] += 1
        return kind == point and counts[kind] == n

    def at_model(kind: str) -> None:
        if event(kind):
            os.kill(os.getpid(), getattr(signal, fault))

    patch(SeededFake, "events", staticmethod(at_model))
    create_temporary = files._create_temporary

    def temporary(path):
        fd = create_temporary(path)
        inside = Path(path).parent.resolve()
        if (inside == out or out in inside.parents) and not Path(path).name.startswith(".sed_fast") \
                and event("write"):
            if fault == "ENOSPC":
                os.close(fd)
                fd = os.open("/dev/full", os.O_WRONLY)
            else:
                os.kill(os.getpid(), getattr(signal, fault))
        return fd

    patch(files, "_create_temporary", temporary)
    return counts


if __name__ == "__main__":
    fault_name, point_name, count, out_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    use_stand_ins()
    install(fault_name, point_name, count, Path(out_dir))
    from sed_fast import cli

    sys.exit(cli.main(sys.argv[5:]))
