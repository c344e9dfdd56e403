"""The official optimiser and schedule (``train_net.py``'s ``build_optimizer``, detectron2's
``WarmupCosineLR``, the SED configs).

* AdamW (betas 0.9/0.999, eps 1e-8), ``SOLVER.BASE_LR`` 2e-4, ``SOLVER.WEIGHT_DECAY`` 1e-4;
* the parameter groups are the model's own (:meth:`sed_fast.models.sed.SEDBase.trainable_parameter_groups`,
  the one place of the official rules): the learning rate times ``SOLVER.CLIP_MULTIPLIER`` (0.01) under
  ``clip_model``, weight decay ``SOLVER.WEIGHT_DECAY_NORM`` (0.0) for detectron2's norm types except the
  decoder's ConvNeXt-block LayerNorm (a plain ``nn.Module`` officially), only ``requires_grad``
  parameters. The official rules for ``backbone``, ``nn.Embedding`` and relative position tables
  touch no trainable parameter of SED (no backbone; the text tower is frozen);
* the cosine schedule without warmup: the lr of iteration k is ``base * 0.5 * (1 + cos(pi k / max_iter))``
  (``CosineParamScheduler(1, 0)`` at ``k / max_iter``; ``SOLVER.BASE_LR_END`` 0);
* full-model gradient clipping: ``clip_grad_norm_`` over all parameters, L2, ``CLIP_VALUE`` 0.01.

The official code makes one parameter group per parameter; here the parameters with the same
(lr, weight decay) share a group, which changes nothing in AdamW's element-wise update.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List

import torch

__all__ = ["SolverConfig", "param_groups", "build_optimizer", "lr_factor", "set_lr"]

@dataclass(frozen=True)
class SolverConfig:
    base_lr: float = 2e-4              # SOLVER.BASE_LR
    weight_decay: float = 1e-4         # SOLVER.WEIGHT_DECAY
    weight_decay_norm: float = 0.0     # SOLVER.WEIGHT_DECAY_NORM (detectron2 default)
    clip_multiplier: float = 0.01      # SOLVER.CLIP_MULTIPLIER
    max_iter: int = 80000              # SOLVER.MAX_ITER
    clip_value: float = 0.01           # SOLVER.CLIP_GRADIENTS.CLIP_VALUE (full_model, L2)
    norm_type: float = 2.0             # SOLVER.CLIP_GRADIENTS.NORM_TYPE
    clip_enabled: bool = True          # SOLVER.CLIP_GRADIENTS.ENABLED


def param_groups(model: torch.nn.Module, config: SolverConfig) -> List[Dict]:
    """The model's ``trainable_parameter_groups`` with ``config``'s values, each group also with
    ``names`` (the parameters' official key names) and ``initial_lr`` (the schedule's base)."""
    make = getattr(model, "trainable_parameter_groups", None)
    if make is None:
        raise TypeError(f"{type(model).__name__} has no trainable_parameter_groups(): not a SED model")
    groups = make(base_lr=config.base_lr, weight_decay=config.weight_decay,
                  weight_decay_norm=config.weight_decay_norm, clip_multiplier=config.clip_multiplier)
    if not groups:
        raise ValueError("the model has no trainable parameter")
    for group in groups:
        group["names"] = group["param_names"]
        group["initial_lr"] = group["lr"]
    return groups


def build_optimizer(model: torch.nn.Module, config: SolverConfig) -> torch.optim.AdamW:
    groups = param_groups(model, config)
    return torch.optim.AdamW(groups, lr=config.base_lr, betas=(0.9, 0.999), eps=1e-8, foreach=None)


def lr_factor(iteration: int, max_iter: int) -> float:
    """detectron2's ``WarmupCosineLR`` without warmup (``WARMUP_ITERS`` 0), end value 0."""
    return 0.5 * (1.0 + math.cos(math.pi * min(iteration, max_iter) / max_iter))


def set_lr(optimizer: torch.optim.Optimizer, iteration: int, max_iter: int) -> float:
    """Set each group's lr for ``iteration``; return the base (largest group's) factor times base lr."""
    factor = lr_factor(iteration, max_iter)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return max(group["lr"] for group in optimizer.param_groups)


def trainable_parameters(optimizer: torch.optim.Optimizer) -> List[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]
