"""The reference SED model: CLIP ConvNeXt encoder + SED decoder, in plain PyTorch.

``SEDReference`` reproduces the official evaluation output (``sem_seg``: sigmoid scores resized to
the input image size). Its state dict has exactly the official key names
(``sem_seg_head.predictor.clip_model.*``, ``sem_seg_head.predictor.transformer.*``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .decoder import EVAL_POOLING, SEDDecoder
from .encoder import (CLIP_RESOLUTION, VariantSpec, create_clip_model, create_tokenizer,
                      dense_image_features, preprocess_images)

MIN_IMAGE_SIDE = 32


class _Predictor(nn.Module):
    def __init__(self, clip_model: nn.Module, transformer: nn.Module):
        super().__init__()
        self.clip_model = clip_model
        self.transformer = transformer


class _SemSegHead(nn.Module):
    def __init__(self, predictor: _Predictor):
        super().__init__()
        self.predictor = predictor


def check_images(images, check_finite: bool = True) -> torch.Tensor:
    """Validate a batch of RGB images in 0..255; return it as a float (B, 3, H, W) tensor.

    Accepts (B, 3, H, W) or (3, H, W), float or uint8. Raises a clear error for anything else
    (grayscale, RGBA, channels-last arrays, NaN/inf pixels, images under 32 px on a side).
    ``check_finite=False`` skips the NaN/inf check (the caller does it without an early sync).
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (B, 3, H, W) or (3, H, W), got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, 3, H, W) or (3, H, W), got {tuple(images.shape)}")
    channels = images.shape[1]
    if channels != 3:
        if images.shape[-1] in (1, 3, 4) and channels > 4:
            hint = " (this looks channels-last: use images.permute(0, 3, 1, 2))"
        elif channels == 1:
            hint = " (grayscale: repeat it to 3 channels, e.g. images.expand(-1, 3, -1, -1))"
        elif channels == 4:
            hint = " (RGBA: drop the alpha channel, images[:, :3])"
        else:
            hint = ""
        raise ValueError(f"images must have 3 RGB channels in dim 1, got shape {tuple(images.shape)}{hint}")
    if images.dtype == torch.uint8:
        images = images.float()
    elif not images.is_floating_point():
        raise TypeError(f"images must be float (RGB in 0..255) or uint8, got {images.dtype}")
    height, width = images.shape[-2:]
    if min(height, width) < MIN_IMAGE_SIDE:
        raise ValueError(f"images must be at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} pixels, got {height}x{width}")
    if not check_finite:
        return images
    low, high = torch.aminmax(images)  # NaN propagates into both: one small host sync checks all
    if not bool(torch.isfinite(low) & torch.isfinite(high)):
        raise ValueError("images contain NaN or infinite values")
    return images


class SEDBase(nn.Module):
    """What the reference and the fast model share: weights layout, vocabulary, input checks."""

    def __init__(self, spec: VariantSpec, *, cer_topk: Optional[int] = None,
                 clip_resolution: int = CLIP_RESOLUTION, text_cache: bool = True,
                 pooling_size: Sequence[int] = EVAL_POOLING, device=None,
                 sem_seg_head: Optional[nn.Module] = None):
        super().__init__()
        self.spec = spec
        self.clip_resolution = _check_resolution(clip_resolution)
        self.text_cache = text_cache
        if sem_seg_head is None:  # else: share another model's weights, no copy
            clip_model = create_clip_model(spec, device=device or "cpu")
            decoder = SEDDecoder(spec.guidance_dims, pooling_size=pooling_size).to(device or "cpu")
            sem_seg_head = _SemSegHead(_Predictor(clip_model, decoder))
        self.sem_seg_head = sem_seg_head
        self.cer_topk = cer_topk  # validated by the property setter
        # Benchmarks only: keep this many classes at each rejection step (see decoder.forced_keep).
        self.force_kept_classes: Optional[int] = None
        self._tokenizer = None
        self.class_names: List[str] = []
        self.register_buffer("text_embeddings", None, persistent=False)
        self.eval()

    # -- parts ----------------------------------------------------------------------------------
    @property
    def clip_model(self) -> nn.Module:
        return self.sem_seg_head.predictor.clip_model

    @property
    def decoder(self) -> SEDDecoder:
        return self.sem_seg_head.predictor.transformer

    @property
    def variant(self) -> str:
        return self.spec.name

    @property
    def cer_topk(self) -> Optional[int]:
        """None: exact decoding; k: category early rejection keeping the per-pixel top-k classes."""
        return self._cer_topk

    @cer_topk.setter
    def cer_topk(self, value: Optional[int]) -> None:
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"cer_topk must be None or a positive int, got {value!r}")
            if value < 1:
                raise ValueError(f"cer_topk must be >= 1 (or None for exact decoding), got {value}")
        self._cer_topk = value

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.decoder.parameters()).dtype

    # -- vocabulary -----------------------------------------------------------------------------
    def set_vocabulary(self, vocabulary, *, cache: Optional[bool] = None, progress: Optional[bool] = None) -> List[str]:
        """Set the classes to segment; computes (or loads from the cache) their text embeddings.

        ``vocabulary``: a list of class names, a built-in vocabulary name (``"ade150"``,
        ``"ade847"``, ``"pc59"``, ``"pc459"``, ``"voc20"``, ``"voc20b"``, ``"coco"``), or a path to a
        JSON list / text file with one name per line. A name with ``", "`` is a synonym list.
        Returns the class names (output channel t of ``forward`` is ``class_names[t]``).
        """
        from ..text import encode_vocabulary
        from ..vocabulary import load_vocabulary

        names = load_vocabulary(vocabulary)
        if self._tokenizer is None:
            self._tokenizer = create_tokenizer(self.spec)
        embeddings = encode_vocabulary(self.clip_model, self._tokenizer, names,
                                       cache=self.text_cache if cache is None else cache, progress=progress)
        self.text_embeddings = embeddings.to(self.device)
        self.class_names = list(names)
        return self.class_names

    def _text_for_decoder(self) -> torch.Tensor:
        if self.text_embeddings is None:
            raise RuntimeError("no vocabulary set: call model.set_vocabulary(names) before segmenting")
        return self.text_embeddings.to(self.dtype)

    # -- image side ------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor):
        """RGB 0..255 (B, 3, H, W) -> (clip_vis_dense, [res2, res3, res4, res5])."""
        x = preprocess_images(images.to(self.device, torch.float32), self.clip_resolution)
        return dense_image_features(self.clip_model, x.to(self.dtype))

    @staticmethod
    def _resize_scores(scores: torch.Tensor, size) -> torch.Tensor:
        """Scores at the decoder's resolution -> the input image size (bilinear, as officially)."""
        return F.interpolate(scores, size=tuple(size), mode="bilinear", align_corners=False)


class SEDReference(SEDBase):
    """The reference SED: official outputs, official cost (for the fast one see ``impl="fast"``)."""

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) or (3, H, W) RGB in 0..255 -> scores (B, T, H, W) in [0, 1] (float32).

        With ``cer_topk`` set, rejected classes have exact zero scores.
        """
        images = check_images(images)
        text = self._text_for_decoder()
        dense, stages = self.encode_image(images)
        res2, res3, res4, res5 = stages
        out = self.decoder(dense, text, (res5, res4, res3, res2), cer_topk=self.cer_topk,
                           force_kept_classes=self.force_kept_classes)
        scores = out[0].sigmoid() if isinstance(out, tuple) else out
        return self._resize_scores(scores.float(), images.shape[-2:])


def _check_resolution(resolution: int) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 32 or resolution % 32:
        raise ValueError(f"clip_resolution must be a positive multiple of 32 (official: 768), got {resolution!r}")
    return resolution
