"""Exporting SED: a self-contained module (vocabulary baked in or an input), torch.export, then
AOTInductor (``.pt2``) or ONNX; every export is checked against the eager model on sample images.
The decoder is the reference's, or with ``impl="fast"`` the fast model's formulation in plain
PyTorch (:mod:`sed_fast.export.fast`)."""
from __future__ import annotations

import json
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
from ..models.rejection import TopKUnion
from . import fast
from .runtime import CONTRACT_KEY

FORMATS = ("pt2", "onnx")
#: The decoders an export can carry: the reference's, or the fast model's (:mod:`sed_fast.export.fast`).
IMPLS = ("reference", "fast")
#: Image sides the exported model accepts (each of H and W); the official resize gives a short side
#: of 640 and a long side of at most 2560.
MIN_SIDE, MAX_SIDE = 32, 2560
#: The smallest upper bound a user may choose for the sides (the check's sample images fit in it).
MIN_MAX_SIDE = 256
#: The largest raw image side an export with the official resize included accepts.
MAX_RAW_SIDE = 32768
#: With the vocabulary as an input (``vocab_input``): the default largest class count T it accepts
#: (every built-in vocabulary fits: ADE-847 is the largest) and the bounds a user may choose.
MAX_CLASSES = 1000
MAX_CLASSES_LIMIT = 65536
#: The name of that second input, as the ONNX model and the pt2 metadata say it.
TEXT_INPUT = "text_embeddings"
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
    """SED with its vocabulary baked in, as a pure function of the image.

    ``impl``: the decoder's formulation, "reference" (the official operation order) or "fast"
    (:class:`sed_fast.export.fast.ExportableFastDecoder`, exact decoding only; ``model`` may be a
    reference or a fast model: the two share parameter names and modules).

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

    With ``vocab_input`` the vocabulary is not baked in: ``forward(image, text_embeddings)`` takes
    the text embeddings (T, P, C) float32 as :meth:`SEDModel.set_vocabulary` makes them (P prompt
    templates, C the CLIP embedding width, both fixed by the checkpoint), T dynamic in
    [1, ``max_classes``]; output channel t is the class of row t.

    Outputs: ``labels`` (H, W) int64, then the scores (T, H, W) float32 with ``return_scores``,
    then with ``cer_topk`` the kept-set sizes (3,) int64 of the three rejection steps.

    Exact decoding, or with ``cer_topk`` category early rejection with a static kept-class budget
    (``kept_budget`` rows, padding masked; see ``SEDDecoder.rejecting_with_budget``): exact while
    the first kept set fits the budget, ``kept_counts[0] > kept_budget`` when it did not. No input
    value checks (they need host control flow)."""

    def __init__(self, model, return_scores: bool = False, cer_topk: Optional[int] = None,
                 kept_budget: Optional[int] = None, max_side: int = MAX_SIDE,
                 input_size: Optional[Tuple[int, int]] = None, resize_included: bool = False,
                 vocab_input: bool = False, max_classes: int = MAX_CLASSES, impl: str = "reference"):
        super().__init__()
        if model.text_embeddings is None:
            raise ExportError("the model has no vocabulary")
        if impl not in IMPLS:
            raise ExportError(f"unknown implementation {impl!r}; expected one of {', '.join(IMPLS)}")
        if impl == "fast" and cer_topk is not None:
            raise ExportError("the fast export decodes exactly: category early rejection is exported with the "
                              "reference's static kept-class budget (--impl reference)")
        self.impl = impl
        self.fast_decoder = fast.ExportableFastDecoder(model.decoder) if impl == "fast" else None
        if vocab_input and cer_topk is not None:
            raise ExportError("category early rejection needs a static kept-class budget of the baked-in "
                              "vocabulary: export it without the vocabulary as an input")
        if vocab_input and not 2 <= max_classes <= MAX_CLASSES_LIMIT:
            raise ExportError(f"the largest class count must be in [2, {MAX_CLASSES_LIMIT}], got {max_classes}")
        self.vocab_input = vocab_input
        self.max_classes = max_classes
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
        text = model._text_for_decoder().detach().clone()
        self.text_shape = tuple(text.shape[1:])  # (P, C): templates, embedding width
        if vocab_input:  # only its dtype and device are kept: the text comes with each call
            text = text[:0]
        self.register_buffer("text", text)
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
    def input_names(self) -> List[str]:
        return ["image"] + ([TEXT_INPUT] if self.vocab_input else [])

    @property
    def output_names(self) -> List[str]:
        return ["labels"] + (["scores"] if self.return_scores else []) + (
            ["kept_counts"] if self.cer_topk is not None else [])

    @property
    def device(self) -> torch.device:
        return self.text.device

    @property
    def formulations(self) -> Optional[Dict[str, str]]:
        """The fast export's pieces and the formulation each runs (None for the reference)."""
        return dict(fast.FORMULATIONS) if self.impl == "fast" else None

    def example_input(self) -> torch.Tensor:
        """An input of the exported signature (its values do not matter), on the model's device."""
        if self.resize_included:
            return torch.zeros(*self.input_size, 3, dtype=torch.uint8, device=self.device)
        return _example(*(self.input_size or (64, 96))).to(self.device)

    def example_inputs(self) -> Tuple[torch.Tensor, ...]:
        """The exported signature's positional inputs: the image, then with ``vocab_input`` text
        embeddings of 3 classes (unit rows, as real ones are)."""
        if not self.vocab_input:
            return (self.example_input(),)
        text = torch.randn(3, *self.text_shape, generator=torch.Generator().manual_seed(0))
        return self.example_input(), (text / text.norm(dim=-1, keepdim=True)).to(self.device)

    def sample_input(self, size: Tuple[int, int]) -> torch.Tensor:
        """The drawn sample scene at ``size`` in the exported model's input layout, dtype and device."""
        image = sample_images([size])[0]
        if self.resize_included:
            image = image[0].permute(1, 2, 0).to(torch.uint8).contiguous()
        return image.to(self.device)

    def dynamic_shapes(self):
        image = None
        if self.input_size is None:
            height = torch.export.Dim("height", min=MIN_SIDE, max=self.max_side)
            width = torch.export.Dim("width", min=MIN_SIDE, max=self.max_side)
            image = {2: height, 3: width}
        if not self.vocab_input:
            return None if image is None else {"image": image}
        return {"image": image, "text_embeddings": {0: torch.export.Dim("classes", min=1, max=self.max_classes)}}

    def forward(self, image: torch.Tensor, text_embeddings: Optional[torch.Tensor] = None):
        if self.resize_included:
            raw = image.permute(2, 0, 1)  # (3, H, W) uint8, read in place
            height, width = raw.shape[-2:]
            image = self.official_resize(raw)[None].to(torch.float32)
        else:
            height, width = image.shape[-2:]
        clip_images = preprocess_images(image.to(torch.float32), self.resolution)
        dense, features = self.model.encode_image(clip_images)
        text = (self.text if text_embeddings is None else text_embeddings).to(self.model.dtype)
        if self.impl == "fast":
            res2, res3, res4, res5 = features
            scores = self.fast_decoder(dense, text, (res5, res4, res3, res2))  # (1, T, h, w)
            kept_counts = None
        elif self.cer_topk is None:
            scores = self.model.decode(dense, text, features)  # (1, T, h, w)
            kept_counts = None
        else:
            res2, res3, res4, res5 = features
            scores, kept_counts = self.model.decoder.rejecting_with_budget(
                dense, text, (res5, res4, res3, res2), TopKUnion(self.cer_topk), self.kept_budget)
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
    text = ""
    if module.vocab_input:
        templates, width = module.text_shape
        text = (f"; {TEXT_INPUT} float32 (T, {templates}, {width}), T in [1, {module.max_classes}], as "
                f"sed-fast embed-vocab writes it")
    return _image_description(module) + text


def _image_description(module: ExportableSED) -> str:
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


IMAGE_HINT = ("The image is RGB in 0..255, already resized as the official pipeline does "
              "(the README's export section shows how).")
RAW_IMAGE_HINT = "The image is the decoded file, uint8 RGB (H, W, 3), of the size the model was exported for."
TEXT_HINT = ("Make the text embeddings with 'sed-fast embed-vocab --vocab NAMES --checkpoint PATH --out vocab.npy' "
             "(numpy.load gives this layout) or with the exported text model.")


def contract(module: ExportableSED) -> Dict[str, object]:
    """The exported model's input contract, stored in the file (see :mod:`sed_fast.export.runtime`):
    per input its name, dtype, shape (an int for a fixed size, [name, low, high] for a dynamic one),
    value range and a hint; the output names; the class names when the vocabulary is baked in."""
    if module.resize_included:
        image = {"name": "image", "dtype": "uint8", "shape": [*module.input_size, 3], "hint": RAW_IMAGE_HINT}
    else:
        if module.input_size is not None:
            sides = list(module.input_size)
        else:
            sides = [["H", MIN_SIDE, module.max_side], ["W", MIN_SIDE, module.max_side]]
        image = {"name": "image", "dtype": "float32", "shape": [1, 3, *sides], "range": [0.0, 255.0],
                 "hint": IMAGE_HINT}
    inputs = [image]
    if module.vocab_input:
        inputs.append({"name": TEXT_INPUT, "dtype": "float32",
                       "shape": [["T", 1, module.max_classes], *module.text_shape], "hint": TEXT_HINT})
    class_names = None if module.vocab_input else list(getattr(module.model, "class_names", None) or [])
    return {"inputs": inputs, "outputs": module.output_names, "class_names": class_names, "impl": module.impl}


def _example(height: int = 64, width: int = 96) -> torch.Tensor:
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0)) * 255


def export_program(module: ExportableSED):
    with torch.no_grad():
        return torch.export.export(module, module.example_inputs(), dynamic_shapes=module.dynamic_shapes())


def export_pt2(module: ExportableSED, out: Path) -> Path:
    """torch.export + AOTInductor into a ``.pt2`` package (loads with torch alone)."""
    return export_pt2_program(export_program(module), out, json.dumps(contract(module)))


def export_pt2_program(program, out: Path, contract_json: str) -> Path:
    """AOTInductor package of an exported program, its input contract in the package's metadata."""
    with torch.no_grad():
        path = torch._inductor.aoti_compile_and_package(
            program, package_path=str(out), inductor_configs={"aot_inductor.metadata": {CONTRACT_KEY: contract_json}})
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
    return export_onnx_program(module, module.example_inputs(), module.dynamic_shapes(), module.input_names,
                               module.output_names, out, json.dumps(contract(module)))


def export_onnx_program(module: nn.Module, inputs, dynamic_shapes, input_names, output_names, out: Path,
                        contract_json: str) -> Path:
    """torch.onnx.export (dynamo) of ``module``, its input contract in the model's metadata_props."""
    _require_onnx()
    import contextlib

    # The exporter prints its progress on stdout: keep stdout for the command's own output (--json).
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        program = torch.onnx.export(module, inputs, dynamo=True, dynamic_shapes=dynamic_shapes,
                                    input_names=input_names, output_names=output_names)
    program.model.metadata_props[CONTRACT_KEY] = contract_json
    program.save(str(out))
    return out


LOADER_NAME = "sed_exported.py"


def loader_source() -> str:
    """The standalone loader (:mod:`sed_fast.export.runtime`) as written beside every export."""
    return (Path(__file__).parent / "runtime.py").read_text(encoding="utf-8")


def check_loader_slot(folder: Path) -> Path:
    """The loader's path in ``folder``; an :class:`ExportError` when a file of that name is there that
    this command did not write (it is never overwritten)."""
    from .runtime import MARKER

    path = Path(folder) / LOADER_NAME
    if path.exists():
        try:
            first = path.read_text(encoding="utf-8").split("\n", 1)[0]
        except (OSError, UnicodeDecodeError):
            first = ""
        if first != MARKER:
            raise ExportError(f"{path} exists and was not written by sed-fast export: the export writes its loader "
                              f"there; move that file or export into another folder")
    return path


def write_loader(folder: Path) -> Path:
    """Write (or refresh) the standalone loader beside an export; see :func:`check_loader_slot`."""
    from ..base.files import atomic_write_text

    path = check_loader_slot(folder)
    source = loader_source()
    if not path.exists() or path.read_text(encoding="utf-8") != source:
        atomic_write_text(path, source)
    return path


class OnnxRunner:
    """An exported ONNX model under ONNX Runtime (CPU), called like the module."""

    def __init__(self, path, threads: Optional[int] = None):
        _require_onnx()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, image: torch.Tensor, text_embeddings: Optional[torch.Tensor] = None):
        feed = {"image": image.detach().cpu().numpy()}
        if text_embeddings is not None:
            feed[TEXT_INPUT] = text_embeddings.detach().cpu().numpy()
        outputs = self.session.run(None, feed)
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
        inputs = (image,) + ((model.text_embeddings.float().contiguous(),) if module.vocab_input else ())
        with torch.no_grad():
            expected = _eager_scores(model, module, image).cpu()
            start = time.perf_counter()
            out = runner(*inputs)
            out = [o.cpu() for o in out] if isinstance(out, (tuple, list)) else [out.cpu()]  # waits for the device
            seconds = time.perf_counter() - start
        labels = out[0]
        scores = out[1] if module.return_scores else None
        expected_labels = expected.argmax(0)
        differ = labels.long() != expected_labels
        row = {"size": list(size), "classes": int(expected.shape[0]), "labels_equal": bool(not differ.any()),
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


def load_pt2_in_fresh_process(path: Path, image, timeout: float = 600) -> torch.Tensor:
    """Load the package with ``torch._inductor.aoti_load_package`` in a new Python that never
    imports sed_fast, run it on ``image`` (a tensor, or the tuple of positional inputs); returns its
    outputs (labels, or (labels, scores))."""
    import tempfile

    path = Path(path).resolve()  # the new process runs in another working directory
    with tempfile.TemporaryDirectory() as folder:
        image_path, out_path = Path(folder) / "image.pt", Path(folder) / "out.pt"
        inputs = tuple(image) if isinstance(image, (tuple, list)) else (image,)
        torch.save([tensor.cpu() for tensor in inputs], image_path)
        code = ("import sys, torch\n"
                "runner = torch._inductor.aoti_load_package(sys.argv[1])\n"
                "with torch.no_grad():\n"
                "    out = runner(*[tensor.to(sys.argv[4]) for tensor in torch.load(sys.argv[2])])\n"
                "out = [o.cpu() for o in out] if isinstance(out, (tuple, list)) else out.cpu()\n"
                "torch.save(out, sys.argv[3])\n"
                "assert not [m for m in sys.modules if m.split('.')[0] == 'sed_fast'], 'sed_fast was imported'\n")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        command = [sys.executable, "-c", code, str(path), str(image_path), str(out_path), str(inputs[0].device)]
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


def exported_for_bench(fmt: str, model, folder, impl: str = "reference") -> Tuple[ExportedSED, float]:
    """Export ``model`` (a reference SED with its text set) in ``fmt`` into ``folder``, its decoder
    as ``impl`` formulates it: (the callable, seconds the export and compile took)."""
    start = time.perf_counter()
    module = ExportableSED(model, return_scores=True, impl=impl).eval()
    if fmt == "pt2":
        runner = torch._inductor.aoti_load_package(str(export_pt2(module, Path(folder) / "model.pt2")))
    elif fmt == "onnx":
        runner = OnnxRunner(export_onnx(module, Path(folder) / "model.onnx"), threads=torch.get_num_threads())
    else:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return ExportedSED(runner), time.perf_counter() - start
