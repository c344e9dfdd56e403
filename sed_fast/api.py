"""The public entry point: :func:`build_sed`."""
from __future__ import annotations

import os
import warnings
from typing import Optional, Union

import torch

from .models.encoder import CLIP_RESOLUTION, variant_spec

IMPLS = ("reference", "fast")
#: Seed of the random weights built when no checkpoint is given: fixed, so that two builds give the
#: same model, the same outputs and the same text-embedding cache entry.
DEFAULT_SEED = 0


class RandomWeightsWarning(UserWarning):
    """A model was built without a checkpoint: its outputs mean nothing."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_sed(variant: str = "b", *, impl: str = "reference",
              checkpoint: Optional[Union[str, os.PathLike, dict]] = None,
              device: Optional[Union[str, torch.device]] = None, dtype: torch.dtype = torch.float32,
              cer_topk: Optional[int] = None, clip_resolution: int = CLIP_RESOLUTION,
              text_cache: bool = True, preprocess: str = "official", seed: int = DEFAULT_SEED,
              **impl_options) -> torch.nn.Module:
    """Build an SED model in eval mode.

    Args:
        variant: ``"b"`` (ConvNeXt-B CLIP, SED-B) or ``"l"`` (ConvNeXt-L CLIP, SED-L).
        impl: ``"reference"`` (plain PyTorch, official outputs) or ``"fast"`` (kernel-backed).
        checkpoint: path to an official checkpoint (detectron2 ``{"model": ...}`` or a bare state
            dict), or a loaded state dict. ``None`` gives random weights (benchmarks, tests) and a
            :class:`RandomWeightsWarning`; ``model.random_weights`` tells which.
        device: default: CUDA if available, else CPU.
        dtype: parameter and compute dtype (float32 is the official precision).
        cer_topk: ``None`` for exact decoding; an int k >= 1 enables category early rejection.
        clip_resolution: side the image is resized to before the encoder (official: 768).
            Smaller values give non-official but cheaper runs (tests, smoke benchmarks).
        text_cache: cache text embeddings on disk (see README, ``SED_FAST_TEXT_CACHE``).
        preprocess: ``"official"``: each raw image is first resized as the official test-time
            pipeline does (shortest edge 640, longest at most 2560; uint8 exactly as PIL's bilinear
            resize, float by bilinear interpolation), so outputs equal the official demo's and
            evaluation's; ``"none"``: images go straight to the encoder's S x S resize (for images
            already resized so).
        seed: seed of the random initialisation (used whatever ``device``: weights are drawn on
            the CPU); with ``checkpoint=None`` the same seed gives the same weights.
        impl_options: options of the chosen implementation (see its class).
    """
    from .checkpoint import load_checkpoint

    spec = variant_spec(variant)
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {', '.join(IMPLS)}")
    if not isinstance(dtype, torch.dtype) or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")
    device = torch.device(device) if device is not None else default_device()
    if impl == "reference":
        from .models.sed import SEDReference as model_class
    else:
        from .models.fast import SEDFast as model_class
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    # Weights are drawn on the CPU from a private generator state: the same seed gives the same
    # model on every device, and the caller's global RNG is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(spec, cer_topk=cer_topk, clip_resolution=clip_resolution, text_cache=text_cache,
                            preprocess=preprocess, device=torch.device("cpu"), **impl_options)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
        model.random_weights = False
    else:
        model.random_weights = True
        warnings.warn(f"SED-{spec.name.upper()} built with RANDOM weights (no checkpoint given, seed {seed}): "
                      "its segmentations are meaningless", RandomWeightsWarning, stacklevel=2)
    return model.to(device=device, dtype=dtype).eval()
