"""The official optimiser and schedule (``train_net.py``'s ``build_optimizer``, detectron2's
``WarmupCosineLR``, the SED configs).

* AdamW (betas 0.9/0.999, eps 1e-8), ``SOLVER.BASE_LR`` 2e-4, ``SOLVER.WEIGHT_DECAY`` 1e-4;
* the learning rate times ``SOLVER.CLIP_MULTIPLIER`` (0.01) for parameters of modules whose name
  contains ``clip_model`` (and ``SOLVER.BACKBONE_MULTIPLIER`` for ``backbone``: none in SED);
* weight decay ``SOLVER.WEIGHT_DECAY_NORM`` (0.0) for parameters of the norm modules detectron2
  lists (BatchNorm, SyncBatchNorm, GroupNorm, InstanceNorm, LayerNorm and subclasses,
  LocalResponseNorm) and ``SOLVER.WEIGHT_DECAY_EMBED`` (0.0) for ``nn.Embedding``. The official
  decoder's ConvNeXt blocks use their own ``LayerNorm(nn.Module)`` (``sed/modeling/transformer/
  convnext.py``), not one of those types: its weights keep the full weight decay, as officially,
  although this package builds that norm as an ``nn.LayerNorm``;
* only parameters with ``requires_grad`` (the text tower and ``logit_scale`` are frozen);
* the cosine schedule without warmup: the lr of iteration k is ``base * 0.5 * (1 + cos(pi k / max_iter))``
  (``CosineParamScheduler(1, 0)`` at ``k / max_iter``; ``SOLVER.BASE_LR_END`` 0);
* full-model gradient clipping: ``clip_grad_norm_`` over all parameters, L2, ``CLIP_VALUE`` 0.01.

The official code makes one parameter group per parameter; here the parameters with the same
(lr, weight decay) share a group, which changes nothing in AdamW's element-wise update.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

__all__ = ["SolverConfig", "param_groups", "build_optimizer", "lr_factor", "set_lr", "NORM_MODULE_TYPES"]

NORM_MODULE_TYPES = (
    torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm, torch.nn.GroupNorm,
    torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d, torch.nn.LayerNorm,
    torch.nn.LocalResponseNorm,
)


@dataclass(frozen=True)
class SolverConfig:
    base_lr: float = 2e-4              # SOLVER.BASE_LR
    weight_decay: float = 1e-4         # SOLVER.WEIGHT_DECAY
    weight_decay_norm: float = 0.0     # SOLVER.WEIGHT_DECAY_NORM (detectron2 default)
    weight_decay_embed: float = 0.0    # SOLVER.WEIGHT_DECAY_EMBED
    clip_multiplier: float = 0.01      # SOLVER.CLIP_MULTIPLIER
    backbone_multiplier: float = 0.0   # SOLVER.BACKBONE_MULTIPLIER (convnextB_768.yaml; no backbone params)
    max_iter: int = 80000              # SOLVER.MAX_ITER
    clip_value: float = 0.01           # SOLVER.CLIP_GRADIENTS.CLIP_VALUE (full_model, L2)
    norm_type: float = 2.0             # SOLVER.CLIP_GRADIENTS.NORM_TYPE
    clip_enabled: bool = True          # SOLVER.CLIP_GRADIENTS.ENABLED


def _is_official_norm(module_name: str, module: torch.nn.Module) -> bool:
    if not isinstance(module, NORM_MODULE_TYPES):
        return False
    # The decoder's ConvNeXt-block norm is a plain nn.Module LayerNorm in the official code.
    return not (".transformer." in f".{module_name}" and module_name.endswith(".cnext.norm")
                and "clip_model" not in module_name)


def param_groups(model: torch.nn.Module, config: SolverConfig) -> List[Dict]:
    """Parameter groups as the official ``build_optimizer``: one per (lr, weight decay), each with
    ``names`` (the parameters' official key names) and ``initial_lr``."""
    groups: Dict[Tuple[float, float], Dict] = {}
    memo = set()
    for module_name, module in model.named_modules():
        for param_name, value in module.named_parameters(recurse=False):
            if not value.requires_grad or id(value) in memo:
                continue
            memo.add(id(value))
            lr, weight_decay = config.base_lr, config.weight_decay
            if "backbone" in module_name:
                lr = lr * config.backbone_multiplier
            if "clip_model" in module_name:
                lr = lr * config.clip_multiplier
            if "relative_position_bias_table" in param_name or "absolute_pos_embed" in param_name:
                weight_decay = 0.0
            if _is_official_norm(module_name, module):
                weight_decay = config.weight_decay_norm
            if isinstance(module, torch.nn.Embedding):
                weight_decay = config.weight_decay_embed
            group = groups.setdefault((lr, weight_decay), {"params": [], "names": [], "lr": lr, "initial_lr": lr,
                                                           "weight_decay": weight_decay})
            group["params"].append(value)
            group["names"].append(f"{module_name}.{param_name}" if module_name else param_name)
    if not groups:
        raise ValueError("the model has no trainable parameter")
    return list(groups.values())


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
