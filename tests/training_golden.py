"""The recipe shared by tools/make_training_golden.py and tests/test_training_golden.py: the small
SED-B, its weights, the batch, and how a gradient is summarised in the fixture.

Weights are drawn from a seeded CPU generator in state-dict order (not by the modules' own
initialisers, which may change between library versions), so the fixture holds no weights.
"""
import zlib

import torch
import torch.nn.functional as F

VERSION = 1
CLIP_RESOLUTION = 96  # multiple of 32; the 45x38 crops are padded to 64x64, then resized to 96
NUM_CLASSES = 4
FULL_NUMEL = 256      # gradients up to this size are stored whole
SAMPLES = 64          # else: entries stored at fixed random positions ...
PROJECTIONS = 2       # ... and projections on fixed Gaussian vectors, plus the norm


def set_weights(model, seed: int = 0) -> None:
    """Every parameter from N(0, 1/fan_in) (tensors of rank >= 2), 1 + N(0, 0.1^2) (norm
    weights, layer scales, logit_scale) or N(0, 0.02^2) (biases), float64 draws, in name order."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters(), key=lambda item: item[0]):
            shape = parameter.shape
            draw = torch.randn(shape, generator=generator, dtype=torch.float64)
            if len(shape) >= 2:
                value = draw / (parameter[0].numel() ** 0.5)
            elif name.endswith("bias"):
                value = 0.02 * draw
            else:
                value = 1 + 0.1 * draw
            parameter.copy_(value.to(parameter.dtype))


def build_model(dtype=torch.float64):
    import warnings

    import sed_fast

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sed_fast.RandomWeightsWarning)
        model = sed_fast.build_sed("b", impl="reference", device="cpu", clip_resolution=CLIP_RESOLUTION)
    model.to(torch.float64)
    set_weights(model)
    generator = torch.Generator().manual_seed(1)
    text = F.normalize(torch.randn(NUM_CLASSES, 80, 640, generator=generator, dtype=torch.float64), dim=-1)
    model.text_embeddings = text
    model.class_names = [f"class{i}" for i in range(NUM_CLASSES)]
    return model.to(dtype).train()


def batch():
    """Two 45x38 uint8 crops and their labels (int64, 255 = ignored)."""
    generator = torch.Generator().manual_seed(2)
    images = (torch.rand(2, 3, 45, 38, generator=generator, dtype=torch.float64) * 255).round().to(torch.uint8)
    labels = torch.randint(0, NUM_CLASSES, (2, 45, 38), generator=generator)
    labels[0, :9] = 255
    labels[1, :, -5:] = 255
    return images, labels


def _draws(name: str, numel: int):
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    index = torch.randint(0, numel, (SAMPLES,), generator=generator)
    vectors = [torch.randn(numel, generator=generator, dtype=torch.float64) for _ in range(PROJECTIONS)]
    return index, vectors


def summarise(name: str, grad: torch.Tensor) -> dict:
    """A gradient as the fixture keeps it (float64)."""
    grad = grad.detach().double().flatten()
    if grad.numel() <= FULL_NUMEL:
        return {"full": grad.clone()}
    index, vectors = _draws(name, grad.numel())
    return {"norm": float(grad.norm()), "sample": grad[index].clone(),
            "projections": torch.stack([v @ grad for v in vectors])}


def compare(name: str, grad: torch.Tensor, stored: dict, samples: bool = True) -> float:
    """Relative error of ``grad`` against its summary: the worst of the norm, the projections
    (each an estimate of |error| / |grad|) and, with ``samples``, the sampled entries (against
    the RMS entry)."""
    grad = grad.detach().double().flatten()
    if "full" in stored:
        return float((grad - stored["full"]).norm() / stored["full"].norm().clamp_min(1e-300))
    norm = stored["norm"]
    index, vectors = _draws(name, grad.numel())
    errors = [abs(float(grad.norm()) - norm) / norm]
    projections = torch.stack([v @ grad for v in vectors])
    errors.append(float((projections - stored["projections"]).abs().max()) / norm)
    if not samples:
        return max(errors)
    scale = norm / grad.numel() ** 0.5  # the RMS entry
    errors.append(float((grad[index] - stored["sample"]).abs().max()) / scale)
    return max(errors)
