"""Exporting SED: a self-contained module (vocabulary baked in), torch.export, then AOTInductor
(``.pt2``) or ONNX; every export is checked against the eager model on sample images."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.encoder import preprocess_images

FORMATS = ("pt2", "onnx")
#: Image sides the exported model accepts (each of H and W); the official resize gives a short side
#: of 640 and a long side of at most 2560.
MIN_SIDE, MAX_SIDE = 32, 2560
#: The smallest upper bound a user may choose for the sides (the check's sample images fit in it).
MIN_MAX_SIDE = 256
#: The largest raw image side an export with the official resize included accepts.
MAX_RAW_SIDE = 32768
#: Exported vs eager: labels equal, scores within this, by compute dtype. float32 is exact to
#: rounding; 16-bit is judged against the error the same computation makes eagerly at that precision
#: (the compiled graph rounds at other places than eager PyTorch).
SCORE_TOLERANCE = 1e-5
SCORE_TOLERANCES = {torch.float32: SCORE_TOLERANCE, torch.bfloat16: 5e-2, torch.float16: 2e-2}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class ExportError(Exception):
    """An export that cannot be made as asked (unsupported option, missing extra): a usage error."""


class ExportableSED(nn.Module):
    """The reference SED with its vocabulary baked in, as a pure function of the image.

    Input, by the official test-time resize's place:

    * left to the caller (default): ``image`` float32 (1, 3, H, W), RGB 0..255, already resized as
      the official pipeline does; H and W dynamic in [MIN_SIDE, ``max_side``], or fixed to
      ``input_size``;
    * included (``resize_included``, which needs ``input_size``, the raw image's size): ``image``
      uint8 (H, W, 3) RGB, the decoded file (EXIF orientation applied, as detectron2 reads it).
      The model resizes it as the official pipeline does, Pillow's bilinear bit for bit
      (:mod:`sed_fast.kernels.pil_bilinear_resize`'s plain PyTorch passes, their tables baked in
      for this one size, in the pass order of the Pillow installed at export time), and its
      outputs come back at the raw size, as the official ``sem_seg``.

    Outputs: ``labels`` (H, W) int64, then the scores (T, H, W) float32 with ``return_scores``,
    then with ``cer_topk`` the kept-set sizes (3,) int64 of the three rejection steps.

    Exact decoding, or with ``cer_topk`` category early rejection with a static kept-class budget
    (``kept_budget`` rows, padding masked; see ``SEDDecoder.rejecting_with_budget``): exact while
    the first kept set fits the budget, ``kept_counts[0] > kept_budget`` when it did not. No input
    value checks (they need host control flow)."""

    def __init__(self, model, return_scores: bool = False, cer_topk: Optional[int] = None,
                 kept_budget: Optional[int] = None, max_side: int = MAX_SIDE,
                 input_size: Optional[Tuple[int, int]] = None, resize_included: bool = False):
        super().__init__()
        if model.text_embeddings is None:
            raise ExportError("the model has no vocabulary")
        if not MIN_MAX_SIDE <= max_side <= MAX_SIDE:
            raise ExportError(f"the largest side must be in [{MIN_MAX_SIDE}, {MAX_SIDE}], got {max_side}")
        if resize_included and input_size is None:
            raise ExportError("the official resize depends on the raw image's size: an export that includes it "
                              "needs a fixed input size")
        self.max_side = max_side  # dynamic H and W lie in [MIN_SIDE, max_side]
        self.input_size = None if input_size is None else (int(input_size[0]), int(input_size[1]))
        if self.input_size is not None and not resize_included and not all(
                MIN_SIDE <= side <= MAX_SIDE for side in self.input_size):
            raise ExportError(f"input size {self.input_size}: each side must be in [{MIN_SIDE}, {MAX_SIDE}]")
        self.resize_included = resize_included
        self.model = model
        self.resolution = model.clip_resolution
        self.return_scores = return_scores
        self.cer_topk = cer_topk
        classes = model.text_embeddings.shape[0]
        self.kept_budget = classes if kept_budget is None else min(int(kept_budget), classes)
        self.register_buffer("text", model._text_for_decoder().detach().clone())
        self.resize_passes: List[str] = []
        if resize_included:
            self._bake_official_resize(*self.input_size)

    def _bake_official_resize(self, height: int, width: int) -> None:
        from ..kernels.pil_bilinear_resize import (installed_pillow_horizontal_first, resample_coefficients,
                                                   resample_passes)

        new_h, new_w = resized_raw_size(height, width)
        self.resized_size = (new_h, new_w)
        self.horizontal_first = installed_pillow_horizontal_first(height, width, new_h, new_w)
        self.resize_passes = resample_passes(height, width, new_h, new_w, self.horizontal_first)
        for which, (size, new_size) in (("h", (width, new_w)), ("v", (height, new_h))):
            if which in self.resize_passes:
                lo, coef = resample_coefficients(size, new_size)
                self.register_buffer(f"resize_{which}_lo", lo.to(self.device))
                self.register_buffer(f"resize_{which}_coef", coef.to(self.device))

    def official_resize(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (3, H, W) at ``input_size`` -> uint8 (3, new_h, new_w), Pillow's bilinear resize."""
        from ..kernels.pil_bilinear_resize import resample_pass_reference

        for which in self.resize_passes:
            lo, coef = getattr(self, f"resize_{which}_lo"), getattr(self, f"resize_{which}_coef")
            image = resample_pass_reference(image, lo, coef, dim=2 if which == "h" else 1)
        return image

    @property
    def output_names(self) -> List[str]:
        return ["labels"] + (["scores"] if self.return_scores else []) + (
            ["kept_counts"] if self.cer_topk is not None else [])

    @property
    def device(self) -> torch.device:
        return self.text.device

    def example_input(self) -> torch.Tensor:
        """An input of the exported signature (its values do not matter), on the model's device."""
        if self.resize_included:
            return torch.zeros(*self.input_size, 3, dtype=torch.uint8, device=self.device)
        return _example(*(self.input_size or (64, 96))).to(self.device)

    def sample_input(self, size: Tuple[int, int]) -> torch.Tensor:
        """The drawn sample scene at ``size`` in the exported model's input layout, dtype and device."""
        image = sample_images([size])[0]
        if self.resize_included:
            image = image[0].permute(1, 2, 0).to(torch.uint8).contiguous()
        return image.to(self.device)

    def dynamic_shapes(self):
        if self.input_size is not None:
            return None
        height = torch.export.Dim("height", min=MIN_SIDE, max=self.max_side)
        width = torch.export.Dim("width", min=MIN_SIDE, max=self.max_side)
        return {"image": {2: height, 3: width}}

    def forward(self, image: torch.Tensor):
        if self.resize_included:
            raw = image.permute(2, 0, 1)  # (3, H, W) uint8, read in place
            height, width = raw.shape[-2:]
            image = self.official_resize(raw)[None].to(torch.float32)
        else:
            height, width = image.shape[-2:]
        clip_images = preprocess_images(image.to(torch.float32), self.resolution)
        dense, features = self.model.encode_image(clip_images)
        text = self.text.to(self.model.dtype)
        if self.cer_topk is None:
            scores = self.model.decode(dense, text, features)  # (1, T, h, w)
            kept_counts = None
        else:
            res2, res3, res4, res5 = features
            scores, kept_counts = self.model.decoder.rejecting_with_budget(
                dense, text, (res5, res4, res3, res2), self.cer_topk, self.kept_budget)
        scores = F.interpolate(scores.float(), size=(height, width), mode="bilinear", align_corners=False)[0]
        outputs = [scores.argmax(0)] + ([scores] if self.return_scores else []) + (
            [kept_counts] if kept_counts is not None else [])
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def resized_raw_size(height: int, width: int) -> Tuple[int, int]:
    """The size the official resize gives a raw image of this size; an :class:`ExportError` when
    that is smaller than the model's smallest side (10x10000 becomes 3x2560)."""
    from ..inputs.preprocess import official_resize_shape

    new_h, new_w = official_resize_shape(height, width)
    if min(new_h, new_w) < MIN_SIDE:
        raise ExportError(f"a {height}x{width} image is {new_h}x{new_w} after the official resize, smaller than "
                          f"{MIN_SIDE} px on a side")
    return new_h, new_w


def input_description(module: ExportableSED) -> str:
    """The exported model's input, in words (printed and in the command's JSON)."""
    if module.resize_included:
        height, width = module.input_size
        return (f"image uint8 ({height}, {width}, 3) RGB, the raw image (the model resizes it as the official "
                f"pipeline does, to {module.resized_size[0]}x{module.resized_size[1]}; outputs at "
                f"{height}x{width})")
    if module.input_size is not None:
        height, width = module.input_size
        return f"image float32 (1, 3, {height}, {width}) RGB 0..255, after the official resize"
    return (f"image float32 (1, 3, H, W) RGB 0..255, H, W in [{MIN_SIDE}, {module.max_side}], after the "
            "official resize")


def build_model(variant: str, vocab, checkpoint: Optional[str], resolution: int, dtype: torch.dtype,
                text_cache: bool = True, device: str = "cpu"):
    """The reference model on ``device`` with its vocabulary, the official resize left to the caller."""
    import warnings

    from ..api import RandomWeightsWarning, build_sed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = build_sed(variant, impl="reference", checkpoint=checkpoint, device=device, dtype=dtype,
                          clip_resolution=resolution, text_cache=text_cache, preprocess="none")
    if isinstance(vocab, torch.Tensor):  # embeddings given directly (tests)
        model.text_embeddings = vocab.to(dtype)
        model.class_names = [f"class{i}" for i in range(vocab.shape[0])]
    else:
        model.set_vocabulary(vocab, progress=False)
    return model


def _example(height: int = 64, width: int = 96) -> torch.Tensor:
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0)) * 255


def export_program(module: ExportableSED):
    with torch.no_grad():
        return torch.export.export(module, (module.example_input(),), dynamic_shapes=module.dynamic_shapes())


def export_pt2(module: ExportableSED, out: Path) -> Path:
    """torch.export + AOTInductor into a ``.pt2`` package (loads with torch alone)."""
    program = export_program(module)
    with torch.no_grad():
        path = torch._inductor.aoti_compile_and_package(program, package_path=str(out))
    return Path(path)


def _require_onnx():
    missing = []
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"--format onnx needs {', '.join(missing)}: pip install -e \".[export]\"")


def export_onnx(module: ExportableSED, out: Path) -> Path:
    """torch.onnx.export (dynamo) of the reference path, opset 18+, dynamic height and width."""
    _require_onnx()
    import contextlib

    # The exporter prints its progress on stdout: keep stdout for the command's own output (--json).
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        program = torch.onnx.export(module, (module.example_input(),), dynamo=True,
                                    dynamic_shapes=module.dynamic_shapes(),
                                    input_names=["image"], output_names=module.output_names)
    program.save(str(out))
    return out


class OnnxRunner:
    """An exported ONNX model under ONNX Runtime (CPU), called like the module."""

    def __init__(self, path, threads: Optional[int] = None):
        _require_onnx()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, image: torch.Tensor):
        outputs = self.session.run(None, {"image": image.detach().cpu().numpy()})
        outputs = [torch.from_numpy(o) for o in outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def sample_images(sizes: Sequence[Tuple[int, int]]) -> List[torch.Tensor]:
    """The drawn sample scene (sed_fast.demo) at each size, float32 (1, 3, H, W) 0..255."""
    import numpy as np

    from ..data.sample_scene import draw_sample_scene as draw_sample

    return [torch.from_numpy(np.array(draw_sample(h, w), dtype=np.float32)).permute(2, 0, 1)[None].contiguous()
            for h, w in sizes]


def _eager_scores(model, module: ExportableSED, image: torch.Tensor) -> torch.Tensor:
    """The eager model's scores (T, H, W) for one input of the exported signature: with the resize
    included, the whole official pipeline on the raw image (``preprocess="official"``: Pillow's own
    resize, scores at the raw size); otherwise the image as given (``preprocess="none"``)."""
    if not module.resize_included:
        return model(image)[0]
    kept = model.preprocess
    model.preprocess = "official"
    try:
        return model(image.permute(2, 0, 1)[None])[0]
    finally:
        model.preprocess = kept


def check(runner, model, module: ExportableSED, sizes: Sequence[Tuple[int, int]]) -> List[Dict[str, object]]:
    """The exported model against the eager model (its whole forward, the same dtype and decoding) on
    the sample images: scores within the dtype's :data:`SCORE_TOLERANCES`, labels equal except on
    pixels where the eager model's top two classes tie (their scores closer than twice the exported
    scores' max difference: rounding decides). With rejection, a row also has the kept-set sizes;
    a first kept set larger than the budget fails the check (the export is then not the official
    result), said by ``budget_exceeded``."""
    tolerance = SCORE_TOLERANCES[model.dtype]
    results = []
    for size in sizes:
        image = module.sample_input(size)
        with torch.no_grad():
            expected = _eager_scores(model, module, image).cpu()
            start = time.perf_counter()
            out = runner(image)
            out = [o.cpu() for o in out] if isinstance(out, (tuple, list)) else [out.cpu()]  # waits for the device
            seconds = time.perf_counter() - start
        labels = out[0]
        scores = out[1] if module.return_scores else None
        expected_labels = expected.argmax(0)
        differ = labels.long() != expected_labels
        row = {"size": list(size), "labels_equal": bool(not differ.any()),
               "labels_differ": int(differ.sum()), "seconds": round(seconds, 3)}
        bound = tolerance
        if scores is not None:
            row["max_score_diff"] = float((scores.float() - expected).abs().max())
            bound = max(row["max_score_diff"], 0.0)
        # A pixel whose eager top two scores tie (within the scores' own difference) may go either way.
        top2 = expected.topk(min(2, expected.shape[0]), dim=0).values
        tie = (top2[0] - top2[-1]) <= 2 * bound if expected.shape[0] > 1 else torch.zeros_like(differ)
        row["labels_differ_not_ties"] = int((differ & ~tie).sum())
        row["ok"] = row["labels_differ_not_ties"] == 0 and row.get("max_score_diff", 0.0) <= tolerance
        if module.cer_topk is not None:
            row["kept_counts"] = [int(n) for n in out[-1]]
            row["budget_exceeded"] = row["kept_counts"][0] > module.kept_budget
            row["ok"] = row["ok"] and not row["budget_exceeded"]
        results.append(row)
    return results


def load_pt2_in_fresh_process(path: Path, image: torch.Tensor, timeout: float = 600) -> torch.Tensor:
    """Load the package with ``torch._inductor.aoti_load_package`` in a new Python that never
    imports sed_fast, run it on ``image``; returns its outputs (labels, or (labels, scores))."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        image_path, out_path = Path(folder) / "image.pt", Path(folder) / "out.pt"
        torch.save(image.cpu(), image_path)
        code = ("import sys, torch\n"
                "runner = torch._inductor.aoti_load_package(sys.argv[1])\n"
                "with torch.no_grad():\n"
                "    out = runner(torch.load(sys.argv[2]).to(sys.argv[4]))\n"
                "out = [o.cpu() for o in out] if isinstance(out, (tuple, list)) else out.cpu()\n"
                "torch.save(out, sys.argv[3])\n"
                "assert not [m for m in sys.modules if m.split('.')[0] == 'sed_fast'], 'sed_fast was imported'\n")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        command = [sys.executable, "-c", code, str(path), str(image_path), str(out_path), str(image.device)]
        done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"loading {path} in a fresh process failed: {done.stderr.strip()[-2000:]}")
        return torch.load(out_path)


class ExportedSED(nn.Module):
    """An exported model (pt2 runner or :class:`OnnxRunner`, exported with scores) called like
    ``SEDReference.forward`` on a batch (B, 3, H, W) whose images are already at their official
    size (e.g. 640 x 640: the official resize keeps it), for ``sed-fast bench``: scores (B, T, H, W)."""

    rejection = None  # exact decoding only (the benchmark sets and restores it)

    def __init__(self, runner):
        super().__init__()
        self.runner = runner

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from ..inputs.preprocess import official_resize_shape

        height, width = images.shape[-2:]
        if official_resize_shape(height, width) != (height, width):
            raise ValueError(f"the exported model leaves the official resize to the caller: benchmark it on images "
                             f"already at their official size (e.g. --image-size 640), not {height}x{width}")
        return torch.stack([self.runner(images[b:b + 1].float().contiguous())[1] for b in range(images.shape[0])])


def exported_for_bench(fmt: str, model, folder) -> Tuple[ExportedSED, float]:
    """Export ``model`` (a reference SED with its text set) in ``fmt`` into ``folder``: (the
    callable, seconds the export and compile took)."""
    start = time.perf_counter()
    module = ExportableSED(model, return_scores=True).eval()
    if fmt == "pt2":
        runner = torch._inductor.aoti_load_package(str(export_pt2(module, Path(folder) / "model.pt2")))
    elif fmt == "onnx":
        runner = OnnxRunner(export_onnx(module, Path(folder) / "model.onnx"), threads=torch.get_num_threads())
    else:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return ExportedSED(runner), time.perf_counter() - start
