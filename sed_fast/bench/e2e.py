"""End-to-end benchmark: the reference SED against the fast one, with outputs checked in the same run.

    sed-fast bench                                   # everything (long: narrow it with the flags)
    sed-fast bench --variants b --batches 1 --vocabs ade150,ade847 --cer-topk 8 --kept-classes 32
    python -m sed_fast.bench.e2e --smoke                 # tiny sizes on CPU, seconds

Implementations (``--impls``):

``reference``            the plain PyTorch reference in float32: the official computation
                         ("official-equivalent").
``reference+autocast``   the reference under ``torch.autocast`` (``--autocast-dtype``, bf16).
``reference+compile``    ``torch.compile(reference)`` (default mode), what a user would try first;
                         the first call (compilation) is reported as ``compile_ms``; a compile
                         failure is a row with the error. Exact decoding only (``--compile-settings``).
``fast``                 ``build_sed(impl="fast")`` with the reference's weights, in each of
                         ``--fast-dtypes`` (float32, bfloat16); ``--fast-options cuda_graphs=true``
                         sets options of the fast model (rows then say ``fast[cuda_graphs=true]``).
``export-pt2``           the reference exported by ``sed-fast export`` (AOTInductor package, CPU),
``export-onnx``          or as ONNX run by ONNX Runtime; exact decoding only; the export and compile
                         time is ``compile_ms``. They leave the official resize to the caller, so
                         they need images already at their official size (``--image-size 640``).
``export-fast-pt2``      the same with the fast decoder (``sed-fast export --impl fast``, see
``export-fast-onnx``     ``sed_fast.export.fast``). Its row, once the same format's reference export
                         row of the vocabulary exists (or the other way round), carries
                         ``export_comparison``: both medians, the fast export's speed-up and which
                         export is recommended (the fast one only where it is faster); the run
                         prints each verdict and lists them at the end.

Settings (``--no-exact``, ``--cer-topk``, ``--kept-classes``): exact decoding; category early
rejection with top-k (``cer_topk``); and ``--kept-classes N``: each rejection step keeps the N
classes with the highest aux score (``model.rejection = ForcedKeep(N)``). Random weights make the official
top-k rule keep nearly every class, so unforced CER rows cost about as much as exact decoding;
the forced rows give the fixed, realistic amount of work of a trained model (the paper's models
keep a few dozen classes). Every row records ``cer_topk`` and ``kept_classes`` (null when unforced).

Matrix: ``--variants`` (b, l) x ``--batches`` x ``--vocabs`` (voc20, pc59, ade150, pc459,
ade847: their class counts) x settings x impls, in the order given (put the important ones first
and set ``--time-budget``: rows not started in time are skipped and listed).

Text: no checkpoint is available, so weights are random. ``--text image`` (default) sets the
T x 80 x D text embeddings directly (``model.text_embeddings`` / ``model.class_names``), drawn from
the batch's own dense image features plus noise so that classes have real score margins;
``--text random`` uses random unit vectors; ``--text vocab`` runs ``model.set_vocabulary`` (the
CLIP text tower; slow on CPU for big vocabularies) and reports its time as ``text_setup_ms``.
The decoder's cost depends on T, not on the text.

Per row: median / p20 / p80 latency of ``model(images)`` over many calls after warm-up (CUDA
events; wall clock on CPU); ``encoder_ms`` (``model.encode_image``), ``text_ms`` (the per-forward
cached text embedding lookup) and ``decoder_ms`` (the decoder alone on precomputed features),
timed separately; ``stages_ms``: each stage's time in recorded forwards (median of 3 on CUDA, 1 on
CPU; see ``sed_fast.bench.profile``), ``stages_total_ms`` the total time of those recorded forwards;
from one more, counted forward: ``stages_flops``, ``stages_bytes``, ``stages_paths`` (where each
stage's multiplying ops ran: ``linear: oneDNN``, ``matmul: MKL`` ...), ``stages_frac_peak`` and
``stages_bound`` (the stage's %peak against its binding roof, compute or memory, with the roofs in
``peaks``: on CPU measured on this machine with the run's threads, see ``sed_fast.bench.common``);
``peak_mem_mb``: the model's own weights plus the peak extra memory of its forwards
(``torch.cuda.max_memory_allocated``; null on CPU), and ``peak_mem_abs_mb``, the process peak.

Checks: the scores of every row are compared with the float32 reference's scores for the same
images and setting, computed in the same run image by image. ``max_abs_diff_vs_reference`` is the
max |difference| (with rejection: over the classes kept by both; ``kept_mismatch`` counts the
(image, class) pairs kept by only one). A row is ``valid`` when the difference is within
``common.E2E_TOLERANCE`` (float32 1e-4, bfloat16 5e-2, float16 2e-2; float32 with ``--tf32`` 1e-2)
and, for float32, the kept sets agree (16-bit and TF32 rows may keep other near-tied classes). An
invalid row keeps its time only in
``unchecked_median_ms``: ``median_ms`` is null, it is not a result. If the reference itself
cannot run (out of memory), rows are unchecked (``valid`` null).

float32 runs with TF32 off (``--tf32`` turns it on for matmuls and cuDNN convolutions, as PyTorch's
default does for convolutions; such rows record ``tf32: true`` and are checked at 1e-2).
Rows are appended to ``<results dir>/<name>.jsonl`` (default ``./sed_fast_results/e2e.jsonl``).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from sed_fast.inputs.images import as_image_list

from sed_fast.models.rejection import rule_for_topk

from . import common
from .instrument import ForcedKeep

VOCAB_SIZES = {"voc20": 20, "pc59": 59, "ade150": 150, "pc459": 459, "ade847": 847, "coco": 171, "voc20b": 59}
IMPLS = ("reference", "reference+autocast", "reference+compile", "fast", "export-pt2", "export-onnx",
         "export-fast-pt2", "export-fast-onnx")
DEFAULT_IMPLS = IMPLS[:4]  # the export rows compile for minutes and need official-size images: asked for by name
NUM_PROMPTS = 80


@dataclass(frozen=True)
class Setting:
    cer_topk: Optional[int] = None
    kept_classes: Optional[int] = None

    @property
    def rejecting(self) -> bool:
        return self.cer_topk is not None or self.kept_classes is not None

    @property
    def label(self) -> str:
        if self.kept_classes is not None:
            return f"kept{self.kept_classes}"
        return "exact" if self.cer_topk is None else f"cer{self.cer_topk}"


def vocab_size(name: str) -> int:
    """Classes of a vocabulary: a known name, ``random<N>`` / ``<N>``, or a built-in vocabulary file."""
    key = name.strip().lower()
    if key in VOCAB_SIZES:
        return VOCAB_SIZES[key]
    digits = key[len("random"):] if key.startswith("random") else key
    if digits.isdigit() and int(digits) > 0:
        return int(digits)
    try:
        from sed_fast.data.vocabulary import load_vocabulary
        return len(load_vocabulary(name))
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"unknown vocabulary {name!r} (known: {', '.join(VOCAB_SIZES)}, or randomN)") from error


# -- models -----------------------------------------------------------------------------------------
class Models:
    """The reference (float32) and fast models of one variant, sharing the reference's weights."""

    def __init__(self, variant: str, device: torch.device, clip_resolution: int, fast_dtypes: Sequence[torch.dtype],
                 seed: int = 0, fast_options: Optional[Dict[str, object]] = None):
        import sed_fast
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sed_fast.RandomWeightsWarning)
            self.reference = sed_fast.build_sed(variant, impl="reference", device=device,
                                                clip_resolution=clip_resolution, text_cache=True)
            self.fast: Dict[str, torch.nn.Module] = {}
            self.fast_errors: Dict[str, str] = {}
            state = self.reference.state_dict()
            for dtype in fast_dtypes:
                name = common.dtype_name(dtype)
                try:
                    model = self._fast_copy(variant, device, dtype, clip_resolution, state)
                    for key, value in (fast_options or {}).items():
                        if not hasattr(model, key):
                            raise ValueError(f"the fast model has no option {key!r}")
                        setattr(model, key, value)
                    self.fast[name] = model
                except Exception as error:  # noqa: BLE001 - reported as rows with the error
                    self.fast_errors[name] = _error_text(error)
        self.variant = variant
        self.device = device

    def _fast_copy(self, variant, device, dtype, clip_resolution, state):
        """A fast model with the reference's weights, as ``build_sed(impl="fast", dtype=dtype)`` lays
        them out (channels-last, ``dtype``): a copy of the reference's weights, not a new build."""
        try:
            from sed_fast.models.fast.model import SEDFast
            from_reference = SEDFast.from_reference
        except (ImportError, AttributeError):
            from_reference = None
        if from_reference is not None:
            model = from_reference(copy.deepcopy(self.reference))
            return model.to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()
        import sed_fast
        model = sed_fast.build_sed(variant, impl="fast", device=device, dtype=dtype,
                                   clip_resolution=clip_resolution, text_cache=True)
        model.load_state_dict(state)  # copy_ keeps the fast model's layout and dtype
        return model

    def all(self) -> List[torch.nn.Module]:
        return [self.reference] + list(self.fast.values())

    def set_text(self, embeddings: torch.Tensor, names: List[str]) -> None:
        for model in self.all():
            model.text_embeddings = embeddings.to(model.device)
            model.class_names = list(names)


def make_text(models: Models, vocab: str, classes: int, mode: str, images: torch.Tensor, seed: int = 0):
    """(T, P, D) embeddings, names, setup time in ms (None unless ``mode == "vocab"``)."""
    return synthetic_text(models.reference, vocab, classes, mode, images, seed)


def synthetic_text(model, vocab: str, classes: int, mode: str, images: torch.Tensor, seed: int = 0):
    """Text embeddings for ``model`` without a trained text tower (see the module docstring).

    mode "vocab": ``model.set_vocabulary(vocab)`` (timed); "random": random unit vectors; "image":
    the dense image features of ``images`` at random pixels plus noise, normalised. Returns
    (embeddings (T, P, D) float32, class names, setup ms or None). Does not set them on the model
    (except "vocab", which does).
    """
    if mode == "vocab":
        start = time.perf_counter()
        names = model.set_vocabulary(vocab, progress=False)
        common.synchronize(images.device)
        return model.text_embeddings, names, (time.perf_counter() - start) * 1e3
    generator = torch.Generator(device="cpu").manual_seed(seed)
    dim = model.spec.embed_dim
    names = [f"{vocab}_{t}" for t in range(classes)]
    if mode == "random":
        return F.normalize(torch.randn(classes, NUM_PROMPTS, dim, generator=generator), dim=-1), names, None
    if mode != "image":
        raise ValueError(f"unknown text mode {mode!r}; expected image, random or vocab")
    with torch.no_grad():
        dense, _ = model.encode_image(model.clip_input(as_image_list(images)))
    features = dense.float().permute(0, 2, 3, 1).reshape(-1, dense.shape[1]).cpu()
    picks = features[torch.randint(features.shape[0], (classes,), generator=generator)]
    noise = torch.randn(classes, NUM_PROMPTS, dim, generator=generator)
    text = F.normalize(picks[:, None, :] + 0.3 * features.std() * noise, dim=-1)
    return text, names, None


# -- checks -----------------------------------------------------------------------------------------
class ReferenceOutputs:
    """The float32 reference's scores for one batch and setting, computed image by image."""

    def __init__(self, model, images: torch.Tensor, setting: Setting):
        self.per_image: List[torch.Tensor] = []
        self.error: Optional[str] = None
        device = images.device
        try:
            with torch.no_grad(), _setting(model, setting):
                for b in range(images.shape[0]):
                    scores = model(images[b:b + 1])[0]
                    if device.type == "cuda" and not _fits_on_device(scores, keep=b + 1):
                        scores = scores.cpu()
                    self.per_image.append(scores)
        except Exception as error:  # noqa: BLE001 - rows are then unchecked
            self.per_image = []
            self.error = _error_text(error)
            common.free_memory(device)

    def compare(self, scores: torch.Tensor, rejecting: bool) -> Tuple[float, int, float]:
        """(max |diff|, kept mismatches, mean kept classes per image) of ``scores`` (B, T, H, W)."""
        worst, mismatch, kept_total = 0.0, 0, 0.0
        for b, expected in enumerate(self.per_image):
            got = scores[b]
            expected = expected.to(got.device)
            if got.shape != expected.shape:
                raise ValueError(f"scores shape {tuple(got.shape)} differs from the reference's "
                                 f"{tuple(expected.shape)}")
            if rejecting:
                kept_got = got.flatten(1).amax(1) > 0
                kept_expected = expected.flatten(1).amax(1) > 0
                mismatch += int((kept_got != kept_expected).sum())
                kept_total += float(kept_got.sum())
                both = (kept_got & kept_expected).nonzero()[:, 0]
            else:
                kept_total += got.shape[0]
                both = None
            step = max(1, (64 << 20) // max(1, got[0].numel()))  # classes per chunk: bounded temporaries
            classes = both if both is not None else torch.arange(got.shape[0], device=got.device)
            for start in range(0, classes.numel(), step):
                idx = classes[start:start + step]
                worst = max(worst, float((got[idx].float() - expected[idx].float()).abs().max()))
        return worst, mismatch, kept_total / max(1, len(self.per_image))


def rejection_rule(cer_topk: Optional[int], kept_classes: Optional[int]):
    """The rule of a benchmark setting: forced (``--kept-classes``) wins over the top-k rule."""
    return ForcedKeep(kept_classes) if kept_classes is not None else rule_for_topk(cer_topk)


def _fits_on_device(tensor: torch.Tensor, keep: int) -> bool:
    free, _ = torch.cuda.mem_get_info(tensor.device)
    return tensor.numel() * tensor.element_size() * keep < free // 4


@contextlib.contextmanager
def _setting(model, setting: Setting):
    old = model.rejection
    model.rejection = rejection_rule(setting.cer_topk, setting.kept_classes)
    try:
        yield
    finally:
        model.rejection = old


def _error_text(error: BaseException) -> str:
    lines = f"{type(error).__name__}: {error}".strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return ("out of memory: " if common.is_oom(error) else "") + text[:300]


def _model_bytes(model) -> int:
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    return total


# -- one row ----------------------------------------------------------------------------------------
def _decoder_fn(model, dense, features, text):
    return lambda: model.decode(dense, text, features)


def _stage_times(model, images, device, repeats: int) -> Tuple[Dict[str, float], float]:
    """Median over ``repeats`` recorded forwards of each stage's time per forward (ms), and the
    median total time of those recorded forwards (ms)."""
    from sed_fast.base.stages import recording

    from .instrument import instrument
    per_stage: Dict[str, List[float]] = {}
    totals: List[float] = []
    for _ in range(repeats):
        with recording(device) as recorder, instrument(model):
            common.synchronize(device)
            begin = time.perf_counter()
            model(images)
            common.synchronize(device)
            totals.append((time.perf_counter() - begin) * 1e3)
            times = recorder.times_ms()
        for name in recorder.order:
            if recorder.depths.get(name, 0) == 0:
                per_stage.setdefault(name, []).append(sum(times.get(name, [0.0])))
    return {name: common.quantile(values, 0.5) for name, values in per_stage.items()}, common.quantile(totals, 0.5)


def _stage_roofline(model, images, device, stages_ms: Dict[str, float], peaks, precision: str) -> Dict[str, object]:
    """Per top-level stage, from one counted forward (:class:`sed_fast.bench.instrument.OpCounter`):
    FLOPs, bytes, where its multiplying ops ran, and its %peak against its binding roof
    (:func:`sed_fast.bench.common.roofline`); empty where counting fails (the row's times stand)."""
    from sed_fast.base.stages import recording

    from .instrument import OpCounter, instrument
    try:
        counter = OpCounter(device)
        with recording(device, nvtx=False), instrument(model), counter:
            model(images)
    except Exception as error:  # noqa: BLE001 - a missing count must not lose the row
        return {"stages_note": f"FLOPs not counted: {_error_text(error)}"}
    roofs = {name: common.roofline(counter.flops.get(name) or None, counter.bytes.get(name) or None, ms, peaks,
                                   precision) for name, ms in stages_ms.items()}
    return {"stages_flops": {name: counter.flops.get(name) or None for name in stages_ms},
            "stages_bytes": {name: counter.bytes.get(name) or None for name in stages_ms},
            "stages_paths": {name: dict(counter.paths[name]) for name in stages_ms if counter.paths.get(name)},
            "stages_frac_peak": {name: roof["frac_peak"] for name, roof in roofs.items()},
            "stages_bound": {name: roof["bound"] for name, roof in roofs.items()},
            "total_flops": sum(counter.flops.values())}


def run_row(impl: str, model, dtype_name: str, setting: Setting, images: torch.Tensor, check: ReferenceOutputs,
            base: Dict[str, object], timing: Dict[str, object], stage_timing: bool, autocast_dtype=None,
            compile_mode: Optional[str] = None) -> Dict[str, object]:
    device = images.device
    precision = "tf32" if dtype_name == "float32" and base.get("tf32") else dtype_name
    row = dict(base, impl=impl, dtype=dtype_name, cer_topk=setting.cer_topk, kept_classes=setting.kept_classes,
               setting=setting.label, median_ms=None, p20_ms=None, p80_ms=None, reps=0, peak_mem_mb=None,
               peak_mem_abs_mb=None, max_abs_diff_vs_reference=None, kept_mismatch=None, kept_mean=None,
               tolerance=common.E2E_TOLERANCE.get(precision), valid=None, error=None, encoder_ms=None,
               text_ms=None, decoder_ms=None, stages_ms=None, stages_total_ms=None, compile_ms=None)
    row["config"] = (f"SED-{base['variant'].upper()} {impl} {dtype_name} {base['vocab']} B={base['batch']} "
                     f"{setting.label}")
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    target = model
    cuda = device.type == "cuda"
    try:
        with torch.no_grad(), _setting(model, setting), autocast:
            if compile_mode is not None:
                import torch._dynamo as dynamo
                dynamo.reset()
                if compile_mode == "eager":  # dynamo tracing only, no code generation (quick CPU checks)
                    target = torch.compile(model, backend="eager")
                else:
                    target = torch.compile(model, mode=None if compile_mode == "default" else compile_mode)
                start = time.perf_counter()
                scores = target(images)
                common.synchronize(device)
                row["compile_ms"] = (time.perf_counter() - start) * 1e3
            else:
                scores = target(images)
            if check.per_image:
                diff, mismatch, kept = check.compare(scores, setting.rejecting)
                row.update(max_abs_diff_vs_reference=diff, kept_mismatch=mismatch if setting.rejecting else None)
                ok = diff <= row["tolerance"] and (precision != "float32" or mismatch == 0)
                row["valid"] = bool(ok)
            else:
                kept = float((scores.flatten(2).amax(2) > 0).sum(1).float().mean()) if setting.rejecting else None
                row["note"] = f"unchecked: reference failed ({check.error})" if check.error else "unchecked"
            row["kept_mean"] = kept if setting.rejecting else None
            del scores
            if cuda:
                torch.cuda.synchronize(device)
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            measured = common.time_fn(lambda: target(images), device, **timing)
            if cuda:
                peak = torch.cuda.max_memory_allocated(device)
                row["peak_mem_mb"] = (peak - before + _model_bytes(model)) / 2 ** 20
                row["peak_mem_abs_mb"] = peak / 2 ** 20
            row.update(measured.to_dict())
            if compile_mode is None and hasattr(model, "clip_input"):
                stage_kw = dict(timing, target_s=float(timing.get("target_s", 1.0)) / 3,
                                min_reps=min(3, int(timing.get("min_reps", 3))))
                prepared = model.clip_input(as_image_list(images))
                if hasattr(model, "decode"):
                    prepared = prepared.contiguous(memory_format=torch.channels_last)
                encode = getattr(model, "_encode", model.encode_image)  # the fast model's (CUDA graphs)
                row["encoder_ms"] = common.time_fn(lambda: encode(prepared), device, **stage_kw).median_ms
                row["text_ms"] = common.time_fn(model._text_for_decoder, device, **stage_kw).median_ms
                dense, features = encode(prepared)
                decoder = _decoder_fn(model, dense, features, model._text_for_decoder())
                row["decoder_ms"] = common.time_fn(decoder, device, **stage_kw).median_ms
                del dense, features, decoder
                if stage_timing:
                    row["stages_ms"], row["stages_total_ms"] = _stage_times(model, images, device,
                                                                            repeats=3 if cuda else 1)
                    row.update(_stage_roofline(model, images, device, row["stages_ms"], base.get("peaks"),
                                               precision))
    except KeyboardInterrupt:  # a time limit (timeout -s INT): record where it stopped, then stop
        row.update(error="interrupted (time limit)" + (" while compiling" if row["compile_ms"] is None
                                                        and compile_mode is not None else ""),
                   valid=False, median_ms=None, p20_ms=None, p80_ms=None, interrupted=True)
    except Exception as error:  # noqa: BLE001 - a failing row is reported, the matrix goes on
        row.update(error=_error_text(error), valid=False, median_ms=None, p20_ms=None, p80_ms=None)
        if compile_mode is not None:
            row["error"] = "torch.compile failed: " + row["error"]
        common.free_memory(device)
    finally:
        if compile_mode is not None:
            try:
                import torch._dynamo as dynamo
                dynamo.reset()
            except Exception:  # noqa: BLE001
                pass
    if row["valid"] is False and row.get("median_ms") is not None:
        row["unchecked_median_ms"] = row["median_ms"]  # wrong outputs: not a result
        row.update(median_ms=None, p20_ms=None, p80_ms=None)
        row["note"] = (f"WRONG OUTPUT: max diff {row['max_abs_diff_vs_reference']:.3g} > {row['tolerance']:g}"
                       + (f", {row['kept_mismatch']} kept-set mismatches" if row.get("kept_mismatch") else ""))
    return row


# -- the matrix -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sed-fast bench",
                                     description="End-to-end benchmark of SED: reference vs fast, outputs checked.")
    parser.add_argument("--variants", default="b,l", help="comma-separated: b, l (default b,l)")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--vocabs", default="voc20,pc59,ade150,pc459,ade847",
                        help="comma-separated vocabularies (voc20, pc59, ade150, pc459, ade847, randomN)")
    parser.add_argument("--impls", default=",".join(DEFAULT_IMPLS),
                        help=f"comma-separated, of: {', '.join(IMPLS)} (default: all but the export rows)")
    parser.add_argument("--fast-dtypes", default="float32,bfloat16", help="dtypes of the fast model")
    parser.add_argument("--fast-options", default="", metavar="KEY=VALUE,...",
                        help="attributes set on the fast models, e.g. cuda_graphs=true; the rows' impl becomes "
                             "fast[KEY=VALUE,...]")
    parser.add_argument("--autocast-dtype", default="bfloat16", help="dtype of reference+autocast")
    parser.add_argument("--no-exact", action="store_true", help="skip exact decoding")
    parser.add_argument("--cer-topk", default="1,2,4,8", help="CER k values (comma-separated; '' for none)")
    parser.add_argument("--kept-classes", default="16,32,64",
                        help="forced kept-class counts per rejection step (comma-separated; '' for none)")
    parser.add_argument("--autocast-settings", default="exact,cer",
                        help="settings of reference+autocast: any of exact, cer, kept (default exact,cer)")
    parser.add_argument("--compile-settings", default="exact", help="settings of reference+compile (default exact)")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode (default, max-autotune, ...; eager: trace only, no code generation)")
    parser.add_argument("--compile-min-seconds", type=float, default=120.0,
                        help="with --time-budget: start a compile row only if this much time is left")
    parser.add_argument("--image-size", type=int, default=768, help="input image side (default 768)")
    parser.add_argument("--clip-resolution", type=int, default=768, help="encoder input side (official 768)")
    parser.add_argument("--text", choices=("image", "random", "vocab"), default="image",
                        help="text embeddings: image-derived synthetic (default), random, or the real vocabulary")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 3; smoke 1)")
    parser.add_argument("--reps", type=int, default=None, help="exact number of timed calls (default: adaptive)")
    parser.add_argument("--target-seconds", type=float, default=None, help="timed seconds per row (default 1.5)")
    parser.add_argument("--min-reps", type=int, default=None, help="fewest timed calls (default 5)")
    parser.add_argument("--max-reps", type=int, default=50, help="most timed calls (default 50)")
    parser.add_argument("--no-stages", action="store_true", help="skip the per-stage breakdown (stages_ms)")
    parser.add_argument("--time-budget", type=float, default=None, help="start no row after this many seconds")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 in float32 (default off)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny CPU run: SED-B, clip resolution 64, 64x64 images, voc20, batch 1, k=1, kept 4")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's; --smoke: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", default=None,
                        help="folder of the results (default ./sed_fast_results, or $SED_FAST_RESULTS_DIR)")
    parser.add_argument("--name", default="e2e", help="results file name (<name>.jsonl)")
    parser.add_argument("--no-save", action="store_true", help="print only, write no results")
    return parser


_SMOKE_DEFAULTS = {"variants": "b", "batches": "1", "vocabs": "voc20", "impls": "reference,reference+autocast,fast",
                   "fast_dtypes": "float32,bfloat16", "cer_topk": "1", "kept_classes": "4", "image_size": 64,
                   "clip_resolution": 64}


def _apply_smoke(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """--smoke changes the defaults of the options not given on the command line."""
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    for key, value in _SMOKE_DEFAULTS.items():
        if "--" + key.replace("_", "-") not in given:
            setattr(args, key, value)


def parse_options(text: str) -> Dict[str, object]:
    """``"a=1,b=true,c=x"`` -> {"a": 1, "b": True, "c": "x"} (ints, floats, booleans, strings)."""
    options: Dict[str, object] = {}
    for part in common.parse_list(text):
        if "=" not in part:
            raise ValueError(f"--fast-options: expected KEY=VALUE, got {part!r}")
        key, value = (x.strip() for x in part.split("=", 1))
        lowered = value.lower()
        if lowered in ("true", "yes", "on"):
            options[key] = True
        elif lowered in ("false", "no", "off"):
            options[key] = False
        else:
            for convert in (int, float):
                try:
                    options[key] = convert(value)
                    break
                except ValueError:
                    continue
            else:
                options[key] = value
    return options


def settings_for(impl: str, settings: Sequence[Setting], args) -> List[Setting]:
    if impl.startswith("export-"):
        wanted = {"exact"}
    elif impl == "reference+compile":
        wanted = set(common.parse_list(args.compile_settings))
    elif impl == "reference+autocast":
        wanted = set(common.parse_list(args.autocast_settings))
    else:
        return list(settings)
    kinds = {s: ("kept" if s.kept_classes is not None else "cer" if s.cer_topk is not None else "exact")
             for s in settings}
    return [s for s in settings if kinds[s] in wanted]


def print_row(row: Dict[str, object], header: bool = False, file=None) -> None:
    columns = (f"{'variant':<7} {'impl':<24} {'dtype':<9} {'vocab':<7} {'T':>4} {'B':>2} {'setting':<7} "
               f"{'median ms':>10} {'enc':>7} {'dec':>8} {'mem MB':>8} {'kept':>6} {'max diff':>9}  ok")
    if header:
        common.print_header(columns, file)
    ok = common.verdict(row.get("valid"), bool(row.get("unchecked_median_ms")), unchecked="unchecked")
    line = (f"SED-{str(row['variant']).upper():<3} {row['impl']:<24} {row['dtype']:<9} {row['vocab']:<7} "
            f"{row['T']:>4} {row['batch']:>2} {row['setting']:<7} {common.fmt(row.get('median_ms'), 2):>10} "
            f"{common.fmt(row.get('encoder_ms'), 1):>7} {common.fmt(row.get('decoder_ms'), 1):>8} "
            f"{common.fmt(row.get('peak_mem_mb'), 0):>8} {common.fmt(row.get('kept_mean'), 1):>6} "
            f"{common.fmt(row.get('max_abs_diff_vs_reference'), 6):>9}  {ok}")
    if row.get("error"):
        line += f"  ({row['error'][:90]})"
    elif row.get("note"):
        line += f"  ({row['note'][:90]})"
    print(line, file=file, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:
        _apply_smoke(args, argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: CUDA is not available (use --device cpu)", file=sys.stderr)
        return 2
    try:
        variants = common.parse_list(args.variants)
        batches = common.parse_list(args.batches, int)
        vocabs = common.parse_list(args.vocabs)
        sizes = {v: vocab_size(v) for v in vocabs}
        impls = common.parse_list(args.impls)
        bad = [i for i in impls if i not in IMPLS]
        if bad:
            raise ValueError(f"unknown impl(s) {', '.join(bad)}; expected some of {', '.join(IMPLS)}")
        fast_dtypes = [common.parse_dtype(d) for d in common.parse_list(args.fast_dtypes)] if "fast" in impls else []
        autocast_dtype = common.parse_dtype(args.autocast_dtype)
        settings = ([] if args.no_exact else [Setting()])
        settings += [Setting(cer_topk=k) for k in common.parse_list(args.cer_topk, int)]
        settings += [Setting(kept_classes=n) for n in common.parse_list(args.kept_classes, int)]
        if any((s.cer_topk or 1) < 1 or (s.kept_classes or 1) < 1 for s in settings):
            raise ValueError("--cer-topk and --kept-classes values must be >= 1")
        if not settings:
            raise ValueError("no settings: give exact decoding, --cer-topk or --kept-classes")
        parse_options(args.fast_options)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with common.settings(args.threads, args.smoke, args.tf32):
        return _run(args, device, variants, batches, vocabs, sizes, impls, fast_dtypes, autocast_dtype, settings)


def _run(args, device, variants, batches, vocabs, sizes, impls, fast_dtypes, autocast_dtype, settings) -> int:
    fast_options = parse_options(args.fast_options)
    timing: Dict[str, object] = {
        "warmup": args.warmup if args.warmup is not None else (0 if args.smoke else 3),
        "reps": args.reps if args.reps is not None else (2 if args.smoke else None),
        "min_reps": args.min_reps if args.min_reps is not None else 5,
        "max_reps": args.max_reps,
        "target_s": args.target_seconds if args.target_seconds is not None else 1.5,
    }
    out_path = None if args.no_save else common.results_dir(args.results_dir) / f"{args.name}.jsonl"
    env = common.environment(device)
    warning = common.routing_warning(env)
    if warning:
        print(warning, flush=True)
    peaks = None
    if not args.no_stages:
        try:
            peaks = common.machine_peaks(device)
        except Exception as error:  # noqa: BLE001 - the times are still worth taking
            print(f"warning: could not measure this machine's GEMM rate and bandwidth: {error}", file=sys.stderr)
    env["peaks"] = peaks
    print(f"device: {env['device']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
          f"commit {env['git_commit']}; text: {args.text}; TF32 {'on' if args.tf32 else 'off'}", flush=True)
    routing = env["linear_routing"]
    print(f"linears: fast float32 on {routing['fast_float32']}, reference on {routing['reference']}; "
          f"{env['threads']} threads; CPU {env['cpu']['name']} (family {env['cpu'].get('family')}, model "
          f"{env['cpu'].get('model')}: {' '.join(env['cpu']['features']) or 'no reported features'})"
          + (f"; roofs {peaks['source']}: " + ", ".join(f"{k} GEMM {v:.3f} TFLOP/s"
                                                       for k, v in peaks["matmul_tflop_per_s"].items())
             + f", {peaks['copy_gb_per_s']:.0f} GB/s" if peaks else ""), flush=True)
    start = time.perf_counter()
    skipped: List[str] = []
    rows: List[Dict[str, object]] = []
    verdicts: List[str] = []  # the fast export against the reference export, per format and vocabulary
    header_done = False

    def out_of_time(cost_s: float = 0.0) -> bool:
        return args.time_budget is not None and time.perf_counter() - start + cost_s > args.time_budget

    for variant in variants:
        if out_of_time():
            skipped.append(f"SED-{variant.upper()} (all)")
            continue
        try:
            models = Models(variant, device, args.clip_resolution, fast_dtypes, seed=args.seed,
                            fast_options=fast_options)
        except Exception as error:  # noqa: BLE001
            print(f"error: cannot build SED-{variant.upper()}: {_error_text(error)}", file=sys.stderr)
            return 1
        for batch in batches:
            generator = torch.Generator(device="cpu").manual_seed(args.seed + batch)
            images = (torch.rand(batch, 3, args.image_size, args.image_size, generator=generator) * 255).to(device)
            for vocab in vocabs:
                if out_of_time():
                    skipped.append(f"SED-{variant.upper()} B={batch} {vocab} (all)")
                    continue
                try:
                    text, names, setup_ms = make_text(models, vocab, sizes[vocab], args.text, images, args.seed)
                except Exception as error:  # noqa: BLE001
                    print(f"error: text for {vocab}: {_error_text(error)}", file=sys.stderr)
                    continue
                models.set_text(text, names)
                classes = len(names)
                exports: Dict[str, object] = {}  # the exported models of this vocabulary (text baked in)
                for setting in settings:
                    check: Optional[ReferenceOutputs] = None
                    for impl in impls:
                        if setting not in settings_for(impl, settings, args):
                            continue
                        targets: List[Tuple[str, Optional[torch.nn.Module], Optional[str]]] = []
                        if impl == "fast":
                            for dtype in fast_dtypes:
                                name = common.dtype_name(dtype)
                                targets.append((name, models.fast.get(name), models.fast_errors.get(name)))
                        elif impl == "reference+autocast":
                            targets.append((common.dtype_name(autocast_dtype), models.reference, None))
                        elif impl.startswith("export-"):
                            exported, export_error, export_ms = _exported(impl, models.reference, exports)
                            targets.append(("float32", exported, export_error))
                        else:
                            targets.append(("float32", models.reference, None))
                        for dtype_name, model, build_error in targets:
                            impl_label = f"fast[{args.fast_options}]" if impl == "fast" and fast_options else impl
                            label = f"SED-{variant.upper()} B={batch} {vocab} {setting.label} {impl} {dtype_name}"
                            needs = args.compile_min_seconds if impl == "reference+compile" else 0.0
                            if out_of_time(needs):
                                skipped.append(label)
                                continue
                            base = dict(env, kind="e2e", variant=variant, vocab=vocab, T=classes, batch=batch,
                                        image_size=args.image_size, clip_resolution=args.clip_resolution,
                                        text_source=args.text, text_setup_ms=setup_ms, tf32=bool(args.tf32))
                            if model is None:
                                row = dict(base, impl=impl_label, dtype=dtype_name, cer_topk=setting.cer_topk,
                                           kept_classes=setting.kept_classes, setting=setting.label, median_ms=None,
                                           p20_ms=None, p80_ms=None, peak_mem_mb=None,
                                           max_abs_diff_vs_reference=None, valid=False, encoder_ms=None,
                                           text_ms=None, decoder_ms=None,
                                           error=build_error if impl.startswith("export-")
                                           else f"fast model unavailable: {build_error}", config=label)
                            else:
                                if check is None:
                                    check = ReferenceOutputs(models.reference, images, setting)
                                row = run_row(impl_label, model, dtype_name, setting, images, check, base, timing,
                                              stage_timing=not args.no_stages,
                                              autocast_dtype=autocast_dtype if impl == "reference+autocast" else None,
                                              compile_mode=args.compile_mode if impl == "reference+compile" else None)
                            if impl.startswith("export-") and row.get("error") is None:
                                row["compile_ms"] = export_ms
                            if impl.startswith("export-"):
                                comparison = export_comparison(row, rows)
                                if comparison is not None:
                                    row["export_comparison"] = comparison
                                    verdicts.append(comparison["verdict"])
                            rows.append(row)
                            if out_path is not None:
                                common.append_rows(out_path, [row])
                            print_row(row, header=not header_done)
                            header_done = True
                            if row.get("export_comparison"):
                                print(f"  {row['export_comparison']['verdict']}", flush=True)
                            if row.get("interrupted"):
                                print("interrupted: stopping (the rows so far are saved)", file=sys.stderr)
                                return 130
                    del check
                    common.free_memory(device)
            del images
        del models
        common.free_memory(device)
    if skipped:
        print(f"time budget ({args.time_budget:.0f} s) reached; skipped {len(skipped)}: " + "; ".join(skipped[:12])
              + (" ..." if len(skipped) > 12 else ""))
    if verdicts:
        print("exports, fast decoder vs reference decoder:\n" + "\n".join(f"  {verdict}" for verdict in verdicts))
    if out_path is not None:
        print(f"{len(rows)} rows appended to {out_path}")
    wrong = [r for r in rows if r.get("valid") is False and r.get("unchecked_median_ms") is not None]
    if wrong:
        print(f"WARNING: {len(wrong)} row(s) with wrong outputs (not reported as results): "
              + "; ".join(str(r["config"]) for r in wrong[:5]), file=sys.stderr)
    return 0


def export_comparison(row: Dict[str, object], rows: Sequence[Dict[str, object]]) -> Optional[Dict[str, object]]:
    """The fast export against the reference export of the same format, model, batch, vocabulary and
    setting, once both rows exist (``row`` is the later one): both medians (null when a row failed
    or its outputs were wrong), the fast export's speed-up, the recommended export and a verdict line.
    The fast export is recommended only where it is checked and faster."""
    impl = str(row.get("impl"))
    if not impl.startswith("export-"):
        return None
    fmt = impl.rsplit("-", 1)[1]
    pair = {f"export-{fmt}": "reference", f"export-fast-{fmt}": "fast"}
    key = ("variant", "batch", "vocab", "setting")
    other = next((r for r in reversed(rows) if r.get("impl") in pair and r.get("impl") != row["impl"]
                  and all(r.get(k) == row.get(k) for k in key)), None)
    if other is None:
        return None
    medians = {pair[r["impl"]]: r.get("median_ms") for r in (row, other)}
    reference_ms, fast_ms = medians["reference"], medians["fast"]
    speedup = reference_ms / fast_ms if reference_ms and fast_ms else None
    recommended = None if reference_ms is None and fast_ms is None else (
        "fast" if fast_ms and (reference_ms is None or fast_ms < reference_ms) else "reference")
    where = f"SED-{str(row['variant']).upper()} B={row['batch']} {row['vocab']} {row['setting']} {fmt}"
    if speedup is not None:
        verdict = (f"{where}: the fast export takes {fast_ms:,.1f} ms, the reference export {reference_ms:,.1f} ms "
                   f"({speedup:.2f}x): recommended: "
                   + ("the fast export (sed-fast export --impl fast)" if recommended == "fast"
                      else "the reference export (the fast one does not win here)"))
    else:
        failed = ", ".join(name for name, ms in medians.items() if ms is None)
        verdict = (f"{where}: no valid time for the {failed} export{'s' if ',' in failed else ''}: recommended: "
                   + (f"the {recommended} export (the only one checked)" if recommended else "neither"))
    return {"format": fmt, "reference_median_ms": reference_ms, "fast_median_ms": fast_ms, "fast_speedup": speedup,
            "recommended": recommended, "verdict": verdict}


def _exported(impl: str, reference, cache: Dict[str, object]):
    """(the exported model, error text, export + compile ms) of ``impl`` (export-pt2 / export-onnx,
    export-fast-pt2 / export-fast-onnx), made once per vocabulary."""
    if impl not in cache:
        import tempfile

        folder = tempfile.mkdtemp(prefix="sed_fast_bench_export_")
        decoder, fmt = ("fast", impl.rsplit("-", 1)[1]) if impl.startswith("export-fast-") else (
            "reference", impl.split("-", 1)[1])
        try:
            from sed_fast.export.core import exported_for_bench
            model, seconds = exported_for_bench(fmt, reference, folder, impl=decoder)
            cache[impl] = (model, None, seconds * 1e3)
        except Exception as error:  # noqa: BLE001 - a row with the error
            cache[impl] = (None, f"export failed: {_error_text(error)}", None)
    return cache[impl]


if __name__ == "__main__":
    sys.exit(main())
