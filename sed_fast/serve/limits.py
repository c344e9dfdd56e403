"""The bounds of ``sed-fast serve``: what one request may ask for, and how long it may take.

A public demo answers anyone, so every request is checked against :class:`Limits` before it waits
for the model: the number of classes, the characters per name (and so the length of the typed
text), the image pixels, the video frames and seconds, and a per-request time limit. A refusal is
an :class:`InputProblem` whose message says what was too large and which option raises the bound.
A vocabulary chosen on the page is a *name* (one of the built-in vocabularies), never a path on the
server.

The time limit is a :class:`Deadline`, checked where the work can stop cleanly: between chunks of
class names while their text embeddings are computed (and before, from the time per name measured
so far), before the forward (from the time per class measured on earlier requests) and after every
batch of video frames. One forward is never cut in
the middle, so a request can overrun by at most one forward of its (bounded) class count.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

DEFAULT_MAX_CLASSES = 1000          # every built-in vocabulary fits (ade847 is the largest)
DEFAULT_MAX_NAME_CHARS = 200        # the longest built-in name (a synonym list of ade847) has 113
DEFAULT_MAX_MEGAPIXELS = 25.0
DEFAULT_MAX_VIDEO_FRAMES = 150
DEFAULT_MAX_VIDEO_SECONDS = 30.0
DEFAULT_TIME_LIMIT_S = 120.0
DEFAULT_MAX_QUEUE = 16


class InputProblem(Exception):
    """A request the app answers with this message on the page."""


class TimeLimitExceeded(InputProblem):
    """A request stopped because it ran past the per-request time limit."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (each one a ``sed-fast serve`` option)."""

    max_classes: int = DEFAULT_MAX_CLASSES
    max_name_chars: int = DEFAULT_MAX_NAME_CHARS
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    max_video_frames: int = DEFAULT_MAX_VIDEO_FRAMES
    max_video_seconds: float = DEFAULT_MAX_VIDEO_SECONDS
    time_limit_s: float = DEFAULT_TIME_LIMIT_S
    max_queue: int = DEFAULT_MAX_QUEUE

    def __post_init__(self):
        problems = [f"{option} must be {rule}, got {value}" for option, value, ok, rule in (
            ("--max-classes", self.max_classes, self.max_classes >= 1, ">= 1"),
            ("--max-name-chars", self.max_name_chars, self.max_name_chars >= 1, ">= 1"),
            ("--max-megapixels", self.max_megapixels, self.max_megapixels > 0, "> 0"),
            ("--max-video-frames", self.max_video_frames, self.max_video_frames >= 1, ">= 1"),
            ("--max-video-seconds", self.max_video_seconds, self.max_video_seconds > 0, "> 0"),
            ("--time-limit", self.time_limit_s, self.time_limit_s > 0, "> 0 seconds"),
            ("--max-queue", self.max_queue, self.max_queue >= 1, ">= 1")) if not ok]
        if problems:
            raise ValueError("; ".join(problems) + ".")

    @classmethod
    def from_options(cls, options) -> "Limits":
        """The limits of parsed ``sed-fast serve`` options (``ValueError`` for a bad value)."""
        return cls(max_classes=options.max_classes, max_name_chars=options.max_name_chars,
                   max_megapixels=options.max_megapixels, max_video_frames=options.max_video_frames,
                   max_video_seconds=options.max_video_seconds, time_limit_s=options.time_limit,
                   max_queue=options.max_queue)

    @property
    def max_pixels(self) -> int:
        return int(self.max_megapixels * 1e6)

    @property
    def max_text_chars(self) -> int:
        """The longest typed class list that can hold only allowed names (with a quote pair and a
        separator around each): longer text is refused before it is parsed."""
        return self.max_classes * (self.max_name_chars + 4)

    def video_frames(self, frame_rate: Optional[float]) -> int:
        """Frames segmented of a clip at ``frame_rate``: ``max_video_frames``, fewer where
        ``max_video_seconds`` of the clip hold fewer frames."""
        if not frame_rate or frame_rate <= 0:
            return self.max_video_frames
        return max(1, min(self.max_video_frames, int(self.max_video_seconds * frame_rate + 0.5)))

    def check_text(self, text: str) -> None:
        """Refuse typed class names too long to be a list of allowed names, before parsing them."""
        if len(text) > self.max_text_chars:
            raise InputProblem(f"The class names are {len(text):,} characters long; this server takes at most "
                               f"{self.max_classes:,} classes of at most {self.max_name_chars:,} characters each. "
                               "Type fewer or shorter names.")

    def check_names(self, names: Sequence[str]) -> List[str]:
        """Refuse too many classes or too long a name; returns the names."""
        names = list(names)
        if len(names) > self.max_classes:
            raise InputProblem(f"{len(names):,} classes were asked for; this server segments at most "
                               f"{self.max_classes:,} classes per request (its --max-classes). Use fewer classes.")
        for i, name in enumerate(names):
            if len(name) > self.max_name_chars:
                shown = name[:40] + "..."
                raise InputProblem(f"Class name {i + 1} ({shown!r}) has {len(name):,} characters; this server takes "
                                   f"at most {self.max_name_chars:,} per name (its --max-name-chars). Shorten it.")
        return names

    def check_pixels(self, width: int, height: int, what: str = "The image") -> None:
        if width * height > self.max_pixels:
            raise InputProblem(f"{what} is {width}x{height} ({width * height / 1e6:.1f} megapixels); this server "
                               f"takes at most {self.max_megapixels:g} megapixels: make it smaller first.")


def builtin_vocabulary_name(choice: str, builtin: Sequence[str]) -> str:
    """``choice`` if it names a built-in vocabulary; anything else (a path, a typo) is refused,
    so a request can never make the server read one of its files."""
    if choice in builtin:
        return choice
    shown = choice if len(choice) <= 60 else choice[:60] + "..."
    raise InputProblem(f"Vocabulary {shown!r} is not one of this server's vocabularies ({', '.join(builtin)}): "
                       "pick one of those, or choose \"typed class names\" and type the names.")


class Deadline:
    """The time left to one request, checked where its work can stop."""

    def __init__(self, seconds: float, clock=time.monotonic):
        self.seconds = seconds
        self._clock = clock
        self.start = clock()

    def elapsed(self) -> float:
        return self._clock() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def check(self, doing: str) -> None:
        """Raise :class:`TimeLimitExceeded` if the time is up (``doing``: what would come next)."""
        if self.left() <= 0:
            raise TimeLimitExceeded(f"This request ran past the server's limit of {self.seconds:g} s per request "
                                    f"(its --time-limit) and was stopped before {doing}. Use fewer classes, a "
                                    "smaller image or a shorter clip.")

    def check_estimate(self, seconds: float, doing: str) -> None:
        """Refuse work estimated to take ``seconds`` when less than that is left."""
        self.check(doing)
        if seconds > self.left():
            raise TimeLimitExceeded(f"{doing[0].upper() + doing[1:]} would take about {seconds:.0f} s (measured on "
                                    f"earlier requests), more than the {max(self.left(), 0):.0f} s left of this "
                                    f"server's limit of {self.seconds:g} s per request (its --time-limit). Use "
                                    "fewer classes.")


class LinearTimes:
    """The time of some work as a function of its size, ``a + b * size`` (for a forward, a: the
    encoder and everything else per image, b: the per-class decoder), fitted to the most recent
    measurements; with one size seen so far, proportional to the size."""

    def __init__(self, keep: int = 16):
        self.keep = keep
        self._seen: List[Tuple[int, float]] = []

    def add(self, size: int, seconds: float) -> None:
        if size > 0:
            self._seen = (self._seen + [(size, seconds)])[-self.keep:]

    def estimate(self, size: int) -> Optional[float]:
        """Seconds for work of ``size``, or None before any measurement."""
        if not self._seen:
            return None
        counts = [float(c) for c, _ in self._seen]
        times = [t for _, t in self._seen]
        mean_c, mean_t = sum(counts) / len(counts), sum(times) / len(times)
        spread = sum((c - mean_c) ** 2 for c in counts)
        if spread == 0:
            return mean_t * size / mean_c
        per_class = max(0.0, sum((c - mean_c) * (t - mean_t) for c, t in self._seen) / spread)
        fixed = max(0.0, mean_t - per_class * mean_c)
        return fixed + per_class * size
