"""The Gradio app of ``sed-fast serve``: segment an uploaded image (or the sample scene) or a short
clip with typed class names or a dataset vocabulary, exact or with category early rejection.

The work is in :class:`Segmenter` (plain Python, testable without a browser): one model object for
every request, text embeddings cached per vocabulary, a lock around the model (the Gradio events
also share one queue slot, so one slow request never runs two forwards at once), every request
checked against the server's bounds (:mod:`sed_fast.serve.limits`: classes, name length, pixels,
video frames and seconds, time per request) before it waits for the model, and every bad input
answered with a message for the page (:class:`InputProblem`), never a traceback.
"""
from __future__ import annotations

import csv
import html
import json
import os
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .limits import (DEFAULT_MAX_MEGAPIXELS, DEFAULT_MAX_VIDEO_FRAMES, Deadline, InputProblem, LinearTimes,
                     Limits, TimeLimitExceeded, builtin_vocabulary_name)

TYPED = "typed class names"
EXACT = "exact"
CER = "category early rejection (top k)"
DEFAULT_CLASSES = "sky, grass, road, house, tree, sun, hill"
_EMBEDDING_CACHE_SIZE = 16
#: Class names encoded at a time when a vocabulary is new: the time limit is checked between chunks.
TEXT_CHUNK = 16
#: The random-weights banner's colours (white on dark red: a contrast of about 8:1; WCAG AA asks for 4.5:1).
BANNER_TEXT = "#ffffff"
BANNER_BACKGROUND = "#a50000"

__all__ = ["Segmenter", "InputProblem", "TimeLimitExceeded", "Limits", "parse_class_names", "build_app",
           "launch_kwargs", "random_weights_banner", "TYPED", "EXACT", "CER", "DEFAULT_MAX_MEGAPIXELS",
           "DEFAULT_MAX_VIDEO_FRAMES"]


def parse_class_names(text: str) -> List[str]:
    """Class names typed on the page: comma-separated, a name holding synonyms in double quotes
    (``cat, "person, individual", grass``: three classes, the second a synonym list), or a JSON
    list as in a vocabulary file. Checked by :func:`sed_fast.data.vocabulary.validate_names`."""
    from ..data.vocabulary import validate_names

    text = (text or "").strip()
    if not text:
        raise InputProblem("No class names: type some (comma-separated, e.g. \"cat, dog, grass\") or pick a "
                           "dataset vocabulary.")
    if text.startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputProblem(f"The class list looks like JSON but is not valid JSON: {error}") from None
    else:
        try:
            rows = list(csv.reader([text], skipinitialspace=True, strict=True))
        except csv.Error as error:
            raise InputProblem(f"Cannot read the class names ({error}): close every double quote.") from None
        names = [name.strip() for name in (rows[0] if rows else [])]
        if len(names) > 1 and names[-1] == "":
            names = names[:-1]  # one trailing comma
        for i, name in enumerate(names):
            if not name:
                raise InputProblem(f"Class name {i + 1} is empty (two commas in a row?).")
    try:
        return validate_names(names, source="class names")
    except (TypeError, ValueError) as error:
        raise InputProblem(str(error)) from None


class Segmenter:
    """One model, many requests, each within ``limits`` (:class:`Limits`; ``max_megapixels`` and
    ``max_video_frames``, where given, replace those two of ``limits``)."""

    def __init__(self, model, *, random_weights: bool, limits: Optional[Limits] = None,
                 max_megapixels: Optional[float] = None, max_video_frames: Optional[int] = None,
                 alpha: float = 0.5, clock=time.monotonic):
        limits = limits or Limits()
        if max_megapixels is not None:
            limits = replace(limits, max_megapixels=max_megapixels)
        if max_video_frames is not None:
            limits = replace(limits, max_video_frames=max_video_frames)
        self.limits = limits
        self.model = model
        self.random_weights = random_weights
        self.alpha = alpha
        self.lock = threading.Lock()
        self._embeddings: "OrderedDict[Tuple[str, ...], object]" = OrderedDict()
        self._tokenizer = None
        self.text_encodings = 0  # how many vocabularies were encoded (the rest came from the cache)
        self.forward_times = LinearTimes()  # of a forward, by its class count
        self.text_times = LinearTimes()  # of new text embeddings, by the names encoded
        self.clock = clock  # what the per-request deadline reads (a test gives its own)

    def deadline(self) -> Deadline:
        """The time limit of a request that starts now (called once it holds the model)."""
        return Deadline(self.limits.time_limit_s, clock=self.clock)

    @property
    def max_pixels(self) -> int:
        return self.limits.max_pixels

    @property
    def max_video_frames(self) -> int:
        return self.limits.max_video_frames

    # -- vocabulary ------------------------------------------------------------------------------
    def class_names(self, typed: str, vocabulary: Optional[str]) -> List[str]:
        """The classes of a request, within the limits: a built-in vocabulary chosen by name (never
        a path: the server reads no file a request names) or the typed names."""
        if vocabulary and vocabulary != TYPED:
            from ..data.vocabulary import BUILTIN_VOCABULARIES, load_vocabulary

            name = builtin_vocabulary_name(str(vocabulary), BUILTIN_VOCABULARIES)
            return self.limits.check_names(load_vocabulary(name))
        if isinstance(typed, str):
            self.limits.check_text(typed)
        return self.limits.check_names(parse_class_names(typed))

    def _set_vocabulary(self, names: List[str], deadline: Optional[Deadline] = None) -> List[str]:
        """Point the model at ``names`` (under the lock): cached embeddings, or encode them once,
        :data:`TEXT_CHUNK` names at a time with the deadline checked between chunks."""
        key = tuple(names)
        cached = self._embeddings.get(key)
        if cached is not None:
            self._embeddings.move_to_end(key)
            self.model.text_embeddings, self.model.class_names = cached
            return list(self.model.class_names)
        try:
            names = self._encode(list(names), deadline)
        except ValueError as error:  # e.g. two names the tokenizer makes identical
            raise InputProblem(f"Class names refused: {error}") from None
        self.text_encodings += 1
        self._embeddings[key] = (self.model.text_embeddings, list(names))
        while len(self._embeddings) > _EMBEDDING_CACHE_SIZE:
            self._embeddings.popitem(last=False)
        return list(names)

    def prepare_vocabulary(self, names: Sequence[str]) -> List[str]:
        """Compute the text embeddings of ``names`` ahead of the requests that use them (no time
        limit applies): e.g. the page's default classes, before the server opens."""
        with self.lock:
            return self._set_vocabulary(self.limits.check_names(list(names)))

    def _encode(self, names: List[str], deadline: Optional[Deadline]) -> List[str]:
        """``model.set_vocabulary`` a chunk at a time. With a deadline, the time per name measured
        so far must let the remaining names finish in time (else the request is refused at once),
        and the first name of a server's life is encoded alone to measure it. Each call refuses
        names its tokenizer makes identical within the chunk; across chunks such names have equal
        embeddings, which are compared here (cheaper than tokenizing every prompt twice)."""
        import torch

        if deadline is None:
            return self.model.set_vocabulary(names, progress=False)
        embeddings = []
        first = 0
        while first < len(names):
            doing = f"computing the text embeddings of classes {first + 1} to {len(names)}"
            estimate = self.text_times.estimate(len(names) - first)
            if estimate is None:
                deadline.check(doing)
            else:
                deadline.check_estimate(estimate, doing)
            size = TEXT_CHUNK if estimate is not None else 1
            chunk = names[first:first + size]
            start = self.clock()
            self.model.set_vocabulary(chunk, progress=False)
            self.text_times.add(len(chunk), self.clock() - start)
            embeddings.append(self.model.text_embeddings)
            first += len(chunk)
        embeddings = torch.cat(embeddings)
        same = same_embeddings(embeddings)
        if same:
            i, j = same
            raise InputProblem(f"Class names {i + 1} ({names[i]!r}) and {j + 1} ({names[j]!r}) are the same once "
                               "tokenized (the tokenizer ignores case and extra spaces): keep one of them.")
        self.model.text_embeddings = embeddings
        self.model.class_names = list(names)
        return list(names)

    def _check_forward_time(self, classes: int, deadline: Deadline) -> None:
        estimate = self.forward_times.estimate(classes)
        deadline.check_estimate(estimate or 0.0, f"the model's forward over {classes} classes")

    def _set_mode(self, mode: Optional[str], k) -> Optional[int]:
        if mode == CER:
            try:
                k = int(k)
            except (TypeError, ValueError):
                raise InputProblem(f"k must be a whole number >= 1, got {k!r}.") from None
            if k < 1:
                raise InputProblem(f"k must be >= 1, got {k}.")
            self.model.cer_topk = k
            return k
        self.model.cer_topk = None
        return None

    # -- images ----------------------------------------------------------------------------------
    def load_image(self, path: Optional[str]):
        from PIL import Image, ImageOps, UnidentifiedImageError

        from ..inputs.image_files import flatten_transparency
        from ..inputs.images import MIN_IMAGE_SIDE

        if not path:
            raise InputProblem("No image: upload one or click the sample scene under Examples.")
        try:
            with Image.open(path) as image:
                width, height = image.size
                self.limits.check_pixels(width, height)
                if min(width, height) < MIN_IMAGE_SIDE:
                    raise InputProblem(f"The image is {width}x{height}: at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} "
                                       "pixels are needed.")
                image = ImageOps.exif_transpose(image)
                return flatten_transparency(image)  # transparency on white, as segment and eval read it
        except InputProblem:
            raise
        except (UnidentifiedImageError, SyntaxError):
            raise InputProblem(f"{Path(path).name} is not an image this app can read (PNG, JPEG, WebP, BMP, "
                               "TIFF...).") from None
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise InputProblem(f"Cannot read {Path(path).name} as an image: {error}") from None

    def segment_image(self, path: Optional[str], typed: str, vocabulary: Optional[str], mode: Optional[str], k):
        """(overlay PIL image, legend HTML, class table rows, timing text)."""
        import torch

        from ..base.stages import recording
        from ..visualize import legend_entries, render_overlay
        from ..data.vocabulary import display_name

        times: Dict[str, float] = {}
        start = time.perf_counter()
        names = self.class_names(typed, vocabulary)  # the cheapest refusals first
        image = self.load_image(path)
        times["read image"] = time.perf_counter() - start
        with self.lock:
            deadline = self.deadline()  # the time waited for the model is not counted
            start = time.perf_counter()
            names = self._set_vocabulary(names, deadline)
            cer = self._set_mode(mode, k)
            times["text embeddings (once per vocabulary)"] = time.perf_counter() - start
            pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
            self._check_forward_time(len(names), deadline)
            start = time.perf_counter()
            with recording(self.model.device, nvtx=False) as recorder:
                try:
                    labels = self.model.predict_labels([pixels.to(self.model.device)])[0]
                except (RuntimeError, MemoryError) as error:
                    raise InputProblem(f"The model failed on this image: {error}") from None
                labels = labels.cpu().numpy()
            times["model"] = time.perf_counter() - start
            if cer is None:  # early rejection's time depends on the image as well: not a measure per class
                self.forward_times.add(len(names), times["model"])
            stages: Dict[str, float] = {}
            for name, ms in recorder.times_ms().items():  # the decoder's many stages as one
                group = name if name in ("preprocess", "image_encoder", "resize") else "decoder"
                stages[group] = stages.get(group, 0.0) + sum(ms) / 1e3
        start = time.perf_counter()
        picture = render_overlay(image, labels, names, alpha=self.alpha, banner=self.random_weights)
        shown = [display_name(name) for name in names]
        entries = legend_entries(labels, shown)
        times["overlay"] = time.perf_counter() - start
        rows = [[name, round(100.0 * share, 2), int(round(share * labels.size))] for _, name, _, share in entries]
        return picture, legend_html(entries), rows, timing_text(times, stages, len(names), cer, image.size)

    # -- video -----------------------------------------------------------------------------------
    def segment_clip(self, path: Optional[str], typed: str, vocabulary: Optional[str], mode: Optional[str], k,
                     out_dir: Optional[Path] = None):
        """(overlay .mp4 path, class table rows, timing text) of a short clip."""
        from ..video.io import SourceError, open_source
        from ..video.run import VideoOptions, segment_video

        if not path:
            raise InputProblem("No video: upload a short clip (mp4, webm, mov...).")
        names = self.class_names(typed, vocabulary)
        try:
            source = open_source(path)
        except SourceError as error:
            raise InputProblem(str(error).replace(path, Path(path).name)) from None
        try:
            self.limits.check_pixels(source.width, source.height, "The video")
        except InputProblem:
            source.close()
            raise
        max_frames = self.limits.video_frames(float(source.rate) if source.rate else None)
        out_dir = Path(out_dir or tempfile.mkdtemp(prefix="sed_fast_serve_"))
        out_dir.mkdir(parents=True, exist_ok=True)
        with self.lock:
            deadline = self.deadline()
            try:
                names = self._set_vocabulary(names, deadline)
            except InputProblem:
                source.close()
                raise
            cer = self._set_mode(mode, k)
            options = VideoOptions(batch_size=4, max_frames=max_frames, alpha=self.alpha,
                                   random_weights=self.random_weights)

            def stop_when_late(record):
                deadline.check(f"segmenting frame {record.get('frames_segmented', 0) + 1}")

            try:
                record = segment_video(self.model, source, names, out_dir, "clip", options, progress=False,
                                       on_progress=stop_when_late)
            except TimeLimitExceeded:
                raise
            except (RuntimeError, MemoryError, OSError, ValueError) as error:
                raise InputProblem(f"The clip could not be segmented: {error}") from None
        if not record.get("frames_written"):
            raise InputProblem("No frame of this video could be decoded.")
        rows = [[c["display_name"], c["frames"], round(100.0 * c["mean_share"], 2)] for c in record["classes"]]
        per_frame = {name: seconds for name, seconds in record["seconds_per_frame"].items()}
        text = (f"{record['frames_written']} frames ({record['width']}x{record['height']}, "
                f"{record['fps_in']:.3g} fps) in {record['seconds']:.2f} s, {record['processing_fps']:.2f} frames/s"
                + (f", stopped at the app's limit of {max_frames} frames"
                   + (f" ({self.limits.max_video_seconds:g} s)" if max_frames < self.max_video_frames else "")
                   if record["frames_written"] >= max_frames else "")
                + (f"; {record['corrupt_frames']} corrupt frame(s) skipped" if record.get("corrupt_frames") else "")
                + "  \nms per frame: " + ", ".join(f"{k} {1000 * v:.1f}" for k, v in per_frame.items())
                + f"  \n{len(names)} classes, " + ("exact decoding" if cer is None else f"CER k={cer}"))
        return str(out_dir / record["outputs"]["overlay"]), rows, text


def same_embeddings(embeddings, tolerance: float = 1e-4) -> Optional[Tuple[int, int]]:
    """The first pair of classes whose text embeddings (T, P, D) are equal within ``tolerance``
    (distance between the flattened rows): classes the tokenizer could not tell apart."""
    import torch

    flat = embeddings.reshape(len(embeddings), -1).float()
    distances = torch.cdist(flat, flat)
    distances.fill_diagonal_(float("inf"))
    close = torch.nonzero(distances <= tolerance)
    if len(close) == 0:
        return None
    i, j = sorted(close[0].tolist())
    return i, j


def legend_html(entries) -> str:
    """The legend as HTML (the same colours as the overlay's legend): one row per class present."""
    rows = "".join(
        f'<li class="sed-legend-item"><span class="sed-swatch" style="display:inline-block;width:1em;height:1em;'
        f'background:rgb{tuple(colour)};margin-right:0.4em;vertical-align:middle"></span>'
        f'<span class="sed-legend-name">{html.escape(name)}</span> {100.0 * share:.1f}%</li>'
        for _, name, colour, share in entries)
    return f'<ul class="sed-legend" style="list-style:none;padding-left:0">{rows}</ul>'


def timing_text(times: Dict[str, float], stages: Dict[str, float], classes: int, cer: Optional[int], size) -> str:
    parts = [f"{name} {1000 * seconds:.0f} ms" for name, seconds in times.items()]
    text = f"{size[0]}x{size[1]} image, {classes} classes, " + ("exact decoding" if cer is None else f"CER k={cer}")
    text += "  \nTime by stage: " + ", ".join(parts)
    if stages:
        text += "  \nModel stages: " + ", ".join(f"{name} {1000 * s:.0f} ms" for name, s in stages.items())
    return text


def random_weights_banner() -> str:
    """The page's notice that the weights are random (every element coloured here, so the page's
    theme cannot lower the contrast)."""
    code = f'style="color:{BANNER_TEXT};background:transparent;font-family:monospace;font-weight:700"'
    return (f'<div id="sed-random-weights" style="background:{BANNER_BACKGROUND};color:{BANNER_TEXT};'
            f'padding:0.6em 0.8em;font-weight:600;border-radius:4px">RANDOM WEIGHTS: no checkpoint was given, so '
            f'the colours of every segmentation here are noise (the page shows that the app works, not what the '
            f'model sees). With a real checkpoint each region is coloured by the class it shows. Start it with '
            f'<code {code}>sed-fast serve --checkpoint model_final.pth</code> for real results.</div>')


def _message(problem: str) -> str:
    return f'<div class="sed-error" style="color:#b00020;font-weight:600">⚠ {html.escape(problem)}</div>'


def build_app(segmenter: Segmenter, *, title: str = "sed_fast: open-vocabulary segmentation",
              examples_dir: Optional[Path] = None, note: str = ""):
    """The Gradio Blocks of the demo (not launched)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from ..data.sample_scene import draw_sample_scene as draw_sample

    examples_dir = Path(examples_dir or tempfile.mkdtemp(prefix="sed_fast_serve_examples_"))
    examples_dir.mkdir(parents=True, exist_ok=True)
    sample = examples_dir / "sample_scene.png"
    draw_sample().save(sample)
    vocabularies = [TYPED, *vocabularies_within(segmenter.limits)]

    def run_image(path, typed, vocabulary, mode, k):
        try:
            picture, legend, rows, timing = segmenter.segment_image(path, typed, vocabulary, mode, k)
            return picture, legend, rows, timing
        except InputProblem as problem:
            return None, _message(str(problem)), [], ""
        except Exception as error:  # noqa: BLE001 - the page gets a sentence, the log gets the rest
            import traceback
            traceback.print_exc()
            return None, _message(f"Unexpected error: {type(error).__name__}: {error}"), [], ""

    def run_clip(path, typed, vocabulary, mode, k):
        try:
            video, rows, timing = segmenter.segment_clip(path, typed, vocabulary, mode, k)
            return video, rows, timing, ""
        except InputProblem as problem:
            return None, [], "", _message(str(problem))
        except Exception as error:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            return None, [], "", _message(f"Unexpected error: {type(error).__name__}: {error}")

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"# {title}")
        if segmenter.random_weights:
            gr.HTML(random_weights_banner())
        if note:
            gr.Markdown(note)
        gr.Markdown(limits_text(segmenter.limits), elem_id="sed-limits")
        with gr.Tab("Image"):
            with gr.Row():
                with gr.Column():
                    image_file = gr.File(label="Image (upload: PNG, JPEG, WebP...)", type="filepath",
                                         elem_id="sed-image-file")
                    classes = gr.Textbox(label="Class names (comma-separated; synonyms of one class in double "
                                               "quotes: \"person, individual\")", value=DEFAULT_CLASSES,
                                         elem_id="sed-classes")
                    vocabulary = gr.Dropdown(vocabularies, value=TYPED, label="Vocabulary",
                                             elem_id="sed-vocabulary")
                    with gr.Row():
                        mode = gr.Radio([EXACT, CER], value=EXACT, label="Decoding", elem_id="sed-mode")
                        k = gr.Number(value=8, precision=0, minimum=1, label="k (for early rejection)",
                                      elem_id="sed-k")
                    run = gr.Button("Segment", variant="primary", elem_id="sed-run")
                    gr.Examples([[str(sample), DEFAULT_CLASSES]], inputs=[image_file, classes],
                                label="Examples: the sample scene")
                with gr.Column():
                    overlay = gr.Image(label="Overlay", type="pil", elem_id="sed-overlay", interactive=False,
                                       format="png")
                    legend = gr.HTML(label="Legend (or the message of a refused request)", elem_id="sed-legend")
                    table = gr.Dataframe(headers=["class", "area %", "pixels"], label="Classes found",
                                         elem_id="sed-table", interactive=False)
                    timing = gr.Markdown(label="Timing", elem_id="sed-timing")
            run.click(run_image, [image_file, classes, vocabulary, mode, k], [overlay, legend, table, timing],
                      concurrency_limit=1, concurrency_id="model", api_name="segment_image")
        with gr.Tab("Video"):
            with gr.Row():
                with gr.Column():
                    clip_file = gr.File(label=f"Short clip (at most {segmenter.max_video_frames} frames are "
                                              "segmented)", type="filepath", elem_id="sed-clip-file")
                    clip_classes = gr.Textbox(label="Class names", value=DEFAULT_CLASSES, elem_id="sed-clip-classes")
                    clip_vocabulary = gr.Dropdown(vocabularies, value=TYPED, label="Vocabulary")
                    with gr.Row():
                        clip_mode = gr.Radio([EXACT, CER], value=EXACT, label="Decoding")
                        clip_k = gr.Number(value=8, precision=0, minimum=1, label="k")
                    clip_run = gr.Button("Segment the clip", variant="primary", elem_id="sed-clip-run")
                with gr.Column():
                    clip_video = gr.Video(label="Overlay video", elem_id="sed-clip-video", interactive=False)
                    clip_message = gr.HTML(label="Message (of a refused request)", elem_id="sed-clip-message")
                    clip_table = gr.Dataframe(headers=["class", "frames", "mean area %"], label="Classes found",
                                              interactive=False)
                    clip_timing = gr.Markdown(label="Timing", elem_id="sed-clip-timing")
            clip_run.click(run_clip, [clip_file, clip_classes, clip_vocabulary, clip_mode, clip_k],
                           [clip_video, clip_table, clip_timing, clip_message],
                           concurrency_limit=1, concurrency_id="model", api_name="segment_clip")
    app.queue(default_concurrency_limit=1, max_size=segmenter.limits.max_queue)  # beyond it: "queue is full"
    return app


def vocabularies_within(limits: Limits) -> List[str]:
    """The built-in vocabularies a request may choose: those of at most ``limits.max_classes``."""
    from ..data.vocabulary import BUILTIN_VOCABULARIES, load_vocabulary

    return [name for name in BUILTIN_VOCABULARIES if len(load_vocabulary(name)) <= limits.max_classes]


def limits_text(limits: Limits) -> str:
    """The bounds, as the page states them."""
    return (f"Each request: at most {limits.max_classes:,} classes of at most {limits.max_name_chars} characters, "
            f"images of at most {limits.max_megapixels:g} megapixels, clips cut at {limits.max_video_frames} "
            f"frames or {limits.max_video_seconds:g} s, and {limits.time_limit_s:g} s of work; at most "
            f"{limits.max_queue} requests wait in the queue.")


def launch_kwargs(host: str, port: Optional[int], share: bool = False) -> dict:
    """What :meth:`gradio.Blocks.launch` gets: local only unless ``share``, no network fonts, and
    quiet (Gradio's own start-up lines suggest ``share=True``; the command prints its own)."""
    import gradio as gr

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    return dict(server_name=host, server_port=port, share=share, inbrowser=False, show_error=False,
                theme=theme, quiet=True, max_file_size="300mb")  # uploads beyond it are refused by Gradio


def sample_classes() -> Sequence[str]:
    return [name.strip() for name in DEFAULT_CLASSES.split(",")]
