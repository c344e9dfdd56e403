"""The GPU pass of ``sed-fast eval``: synthetic images at the real size, fast vs reference, fp32 and
bf16, images/s with and without loader workers.

On a CUDA machine: ``pytest -q -s tests/evaluation/test_eval_gpu.py`` (``-s`` shows the table; with
``SED_EVAL_GPU_OUT=DIR`` the table and every run's results.json are also written there). Without
CUDA only the smoke test runs: the same script, tiny, on the CPU.
"""
import contextlib
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sed_fast import cli
from sed_fast.evaluation.datasets import DATASETS

pytestmark = pytest.mark.filterwarnings("ignore::sed_fast.RandomWeightsWarning")

# Sizes of real ADE20K / Pascal validation images (H, W).
REAL_SIZES = [(512, 683), (683, 512), (375, 500), (500, 375), (512, 512), (427, 640)]


def make_ade150(root: Path, count: int, sizes, seed: int = 0):
    """``count`` images in the ADE-150 layout: noise with smooth blobs, labels of the 150 classes
    in blocks (so classes are large and IoUs are not all near zero), ignore (255) on a border."""
    spec = DATASETS["ade150"]
    rng = np.random.default_rng(seed)
    (root / spec.image_dir).mkdir(parents=True, exist_ok=True)
    (root / spec.label_dir).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        h, w = sizes[i % len(sizes)]
        blocks = rng.integers(0, 150, (4, 4))
        label = np.kron(blocks, np.ones((-(-h // 4), -(-w // 4)), dtype=np.int64))[:h, :w]
        label[:8] = 255
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / spec.image_dir / f"ADE_val_{i:08d}.jpg", quality=90)
        Image.fromarray(label.astype(np.uint8)).save(root / spec.label_dir / f"ADE_val_{i:08d}.png")


def gpu_pass(root: Path, out: Path, device: str, resolution: int, runs, dataset: str = "ade150"):
    """Run each ``(name, extra options)`` of ``runs`` through ``sed-fast eval``; return their rows."""
    rows = []
    for name, extra in runs:
        target = out / name
        stdout, stderr = io.StringIO(), io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cli.main(["eval", dataset, "--data-root", str(root), "--random-weights", "--device", device,
                             "--resolution", str(resolution), "--out", str(target), "--no-plot",
                             "--progress-every", "10", *extra])
        assert code == 0, f"{name}: exit {code}\n{stderr.getvalue()[-3000:]}"
        results = json.loads((target / "results.json").read_text())
        row = {"run": name, "options": " ".join(extra), "wall_s": round(time.perf_counter() - start, 1),
               "images": results["images"]["evaluated"],
               "images_per_s": results["timing"]["images_per_second_this_session"],
               "mIoU": {m: r["summary"]["mIoU"] for m, r in results["models"].items()}}
        if "comparison" in results:
            c = results["comparison"]
            row["pixel_agreement"] = c["pixel_agreement"]
            row["classes_with_different_iou"] = len(c["classes_with_different_iou"])
            row["mIoU_difference"] = c["summary_difference"]["mIoU"]
        if device.startswith("cuda"):
            row["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
        rows.append(row)
    return rows


GPU_RUNS = [
    ("compare_fp32", ["--impl", "fast", "--compare", "reference", "--batch-size", "4", "--workers", "8"]),
    ("compare_bf16", ["--impl", "fast", "--compare", "reference", "--dtype", "bf16", "--batch-size", "4",
                      "--workers", "8"]),
    ("reference_fp32_w8", ["--impl", "reference", "--batch-size", "4", "--workers", "8"]),
    ("fast_fp32_w0", ["--impl", "fast", "--batch-size", "4", "--workers", "0"]),
    ("fast_fp32_w8", ["--impl", "fast", "--batch-size", "4", "--workers", "8"]),
    ("fast_bf16_w8", ["--impl", "fast", "--dtype", "bf16", "--batch-size", "8", "--workers", "8"]),
    ("fast_bf16_w8_cer8", ["--impl", "fast", "--dtype", "bf16", "--batch-size", "8", "--workers", "8",
                           "--cer-topk", "8"]),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU pass needs a CUDA device")
def test_gpu_pass(tmp_path):
    count = int(os.environ.get("SED_EVAL_GPU_IMAGES", "200"))
    make_ade150(tmp_path / "data", count, REAL_SIZES)
    rows = gpu_pass(tmp_path / "data", tmp_path / "out", "cuda", 768, GPU_RUNS)
    table = "\n".join(json.dumps(row) for row in rows)
    print("\n" + table)
    if os.environ.get("SED_EVAL_GPU_OUT"):
        target = Path(os.environ["SED_EVAL_GPU_OUT"])
        target.mkdir(parents=True, exist_ok=True)
        (target / "gpu_pass.jsonl").write_text(table + "\n")
        for name, _ in GPU_RUNS:
            (target / f"{name}.json").write_text((tmp_path / "out" / name / "results.json").read_text())
    by_name = {row["run"]: row for row in rows}
    assert all(row["images"] == count for row in rows)
    # fp32: fast and reference differ only by float rounding, which flips the argmax only where two
    # random-weight scores nearly tie; a real difference would leave ~1/150 of the pixels alike
    assert by_name["compare_fp32"]["pixel_agreement"] > 0.9


def test_gpu_pass_script_smoke(tmp_path, shared_build, monkeypatch):
    """The same script on the CPU, tiny: 3 images, encoder side 64, a 3-class dataset."""
    import dataclasses

    import sed_fast.evaluation.datasets as datasets_mod
    from eval_synthetic import TINY

    registry = dict(datasets_mod.DATASETS)
    registry["ade150"] = dataclasses.replace(registry["ade150"], vocabulary=TINY)
    monkeypatch.setattr(datasets_mod, "DATASETS", registry)
    spec = registry["ade150"]
    root = tmp_path / "data"
    make_ade150(root, 3, [(40, 56), (48, 36)])
    for path in (root / spec.label_dir).iterdir():  # the 150 classes -> the 3 of the tiny vocabulary
        label = np.array(Image.open(path))
        Image.fromarray(np.where(label == 255, 255, label % 3).astype(np.uint8)).save(path)
    runs = [("compare", ["--impl", "fast", "--compare", "reference", "--batch-size", "2", "--workers", "0"]),
            ("reference", ["--impl", "reference", "--workers", "1"])]
    rows = gpu_pass(root, tmp_path / "out", "cpu", 64, runs)
    assert [row["images"] for row in rows] == [3, 3]
    assert 0 <= rows[0]["pixel_agreement"] <= 1 and rows[0]["images_per_s"] > 0
