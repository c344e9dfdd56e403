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


class FastFallbackWarning(UserWarning):
    """``build_sed`` without ``impl`` could not build the fast model and built the reference one."""


class SlowDtypeWarning(UserWarning):
    """A 16-bit model on a CPU without that dtype's matrix instructions: emulated, slower than float32."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_sed(variant: str = "b", *, impl: Optional[str] = None,
              checkpoint: Optional[Union[str, os.PathLike, dict]] = None,
              device: Optional[Union[str, torch.device]] = None, dtype: torch.dtype = torch.float32,
              cer_topk: Optional[int] = None, clip_resolution: int = CLIP_RESOLUTION,
              text_cache: bool = True, preprocess: str = "official", seed: int = DEFAULT_SEED,
              **impl_options) -> torch.nn.Module:
    """Build an SED model in eval mode.

    Args:
        variant: ``"b"`` (ConvNeXt-B CLIP, SED-B) or ``"l"`` (ConvNeXt-L CLIP, SED-L).
        impl: ``"fast"`` (kernel-backed, the same outputs to float rounding) or ``"reference"``
            (plain PyTorch, the official code's structure). ``None`` (the default, as ``sed-fast
            segment``): fast, or the reference with a :class:`FastFallbackWarning` saying why if the
            fast model cannot be built here; ``impl="fast"`` raises instead.
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
    if impl is None:
        try:
            return _build(variant, "fast", checkpoint, device, dtype, cer_topk, clip_resolution, text_cache,
                          preprocess, seed, impl_options)
        except (KeyboardInterrupt, MemoryError, TypeError, ValueError):
            raise  # interrupted, or an argument error: the reference model would refuse it too
        except Exception as error:  # noqa: BLE001 - e.g. an import error of the kernel stack
            from .data.checkpoint import CheckpointError
            if isinstance(error, (CheckpointError, OSError)):
                raise  # the checkpoint: the same for both models
            warnings.warn(f"the fast SED model cannot be built ({type(error).__name__}: {error}); built the "
                          "reference model instead (pass impl='fast' to get the error)", FastFallbackWarning,
                          stacklevel=2)
        impl = "reference"
    return _build(variant, impl, checkpoint, device, dtype, cer_topk, clip_resolution, text_cache, preprocess,
                  seed, impl_options)


def _warn_if_emulated(dtype: torch.dtype) -> None:
    from .base.cpu_features import NATIVE_16BIT, has_native_16bit

    if has_native_16bit(dtype) is False:
        name = str(dtype).replace("torch.", "")
        warnings.warn(f"{name} on this CPU is emulated (it has none of {', '.join(NATIVE_16BIT[dtype])}): "
                      "PyTorch converts around every matrix product, several times slower than float32 "
                      "(SED-B measured 7x slower on an AVX2 CPU); float32 is faster here, and exact",
                      SlowDtypeWarning, stacklevel=4)


def _build(variant, impl, checkpoint, device, dtype, cer_topk, clip_resolution, text_cache, preprocess, seed,
           impl_options) -> torch.nn.Module:
    from .data.checkpoint import load_checkpoint

    spec = variant_spec(variant)
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {', '.join(IMPLS)}")
    if not isinstance(dtype, torch.dtype) or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cpu" and dtype != torch.float32:
        _warn_if_emulated(dtype)
    if impl == "reference":
        from .models.sed import SEDReference as model_class
    else:
        from .models.fast.model import SEDFast as model_class
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
                      "its segmentations are meaningless", RandomWeightsWarning, stacklevel=3)
    return model.to(device=device, dtype=dtype).eval()
