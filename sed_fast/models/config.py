"""What is fixed about the released SED models: the two variants and the decoder's channel plan.

One place for these facts; the encoder, the decoder, the fast layers, the benchmarks and the compile
report read them from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple


@dataclass(frozen=True)
class VariantSpec:
    """What distinguishes the released SED models."""

    name: str                      # "b" or "l"
    checkpoint_name: str           # "sed-b" / "sed-l" (names used in the shapes fixture)
    clip_model: str                # open_clip model name
    embed_dim: int                 # D, the CLIP embedding width
    trunk_dims: Tuple[int, int, int, int]  # channels of res2..res5
    # Stochastic regularisation of the CLIP image tower while training, as the official code's own
    # open_clip copy configures it (its convnext_base_w_320 has none; the installed open_clip's may
    # differ): stochastic depth rate over the trunk's blocks, dropout in the projection head.
    train_drop_path: float = 0.0
    train_head_dropout: float = 0.0

    @property
    def guidance_dims(self) -> Tuple[int, int, int]:
        """Channels of res4, res3, res2: the decoder guidance inputs."""
        return (self.trunk_dims[2], self.trunk_dims[1], self.trunk_dims[0])


VARIANTS: Dict[str, VariantSpec] = {
    "b": VariantSpec("b", "sed-b", "convnext_base_w_320", 640, (128, 256, 512, 1024)),
    "l": VariantSpec("l", "sed-l", "convnext_large_d_320", 768, (192, 384, 768, 1536),
                     train_drop_path=0.1, train_head_dropout=0.1),
}

# CLIP pixel statistics in 0..255 units (MODEL.CLIP_PIXEL_MEAN / STD of the official config).
CLIP_PIXEL_MEAN = (122.7709383, 116.7460125, 104.09373615)
CLIP_PIXEL_STD = (68.5005327, 66.6321579, 70.3231630)
CLIP_RESOLUTION = 768  # the official model resizes every input to 768x768


def variant_spec(variant: str) -> VariantSpec:
    """The spec of ``variant`` ("b"/"l", also accepted: "sed-b", "B", "convnext_base_w_320"...)."""
    key = str(variant).lower().strip()
    for spec in VARIANTS.values():
        if key in (spec.name, spec.checkpoint_name, spec.clip_model, f"sed_{spec.name}"):
            return spec
    raise ValueError(f"unknown SED variant {variant!r}; expected 'b' (ConvNeXt-B) or 'l' (ConvNeXt-L)")


# Channel plan of the released models (configs/convnext{B,L}_768.yaml).
HIDDEN_DIM = 128
DECODER_DIMS = (64, 32, 16)
DECODER_GUIDANCE_PROJ_DIMS = (32, 16, 8)
CORR_GUIDANCE_DIMS = (80, 32, 16)  # input channels of the three corr-guidance ConvTransposes
NUM_HEADS = 4
KERNEL_SIZE = 9
EVAL_POOLING = (1, 1)  # eval.sh overrides the config's (2, 2) with (1, 1)
TRAIN_POOLING = (2, 2)  # configs/convnext{B,L}_768.yaml POOLING_SIZES: what training uses
#: Prompt templates per class (the 80 OpenAI ImageNet templates): conv1's input channels.
NUM_PROMPTS = 80


# The official training recipe (configs/config.yaml + convnext{B,L}_768.yaml, train_net.py
# build_optimizer; detectron2 defaults where the configs are silent).
TRAIN_IGNORE_VALUE = 255        # MODEL.SEM_SEG_HEAD.IGNORE_VALUE
TRAIN_SIZE_DIVISIBILITY = 32    # MODEL.MASK_FORMER.SIZE_DIVISIBILITY: the model pads its input to it
TRAIN_BASE_LR = 2e-4            # SOLVER.BASE_LR (AdamW, WarmupCosineLR, 80k iterations, 4 images)
TRAIN_WEIGHT_DECAY = 1e-4       # SOLVER.WEIGHT_DECAY
TRAIN_WEIGHT_DECAY_NORM = 0.0   # SOLVER.WEIGHT_DECAY_NORM (detectron2 default): norm layers' parameters
TRAIN_CLIP_MULTIPLIER = 0.01    # SOLVER.CLIP_MULTIPLIER: learning-rate factor of the CLIP parameters
TRAIN_GRAD_CLIP_NORM = 0.01     # SOLVER.CLIP_GRADIENTS: full-model L2 norm clipping at 0.01
