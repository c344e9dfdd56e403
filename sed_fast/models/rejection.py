"""Category early rejection (CER): which classes go on to the next decoder layer.

After conv1 and after decoder layers 1 and 2 the aux head scores every class at every pixel; a
rejection rule picks the classes that go on. A rule answers in two forms:

* ``keep_mask(aux)``: aux logits (1, T, h, w) of one image -> (T,) bool, for the reference decoder,
  which indexes its rows with it as the official ``fast_conv_decoder`` does;
* ``select(aux)``: aux logits (B, T, h, w), ``-inf`` for classes rejected earlier -> (flat_idx,
  class_offsets) on the device (see :func:`sed_fast.kernels.topk_union_reject`), for the fast
  decoder, which keeps a ragged set of classes per image.

A model rejects when its ``rejection`` is not None (``cer_topk=k`` sets :class:`TopKUnion`) and
hands the rule to its decoder with each call; the decoders ask only for the forms above
(:class:`sed_fast.models.decoder.RejectionRule`), so they stand on the ops and not on this module.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..kernels.topk_union_reject import check_topk, topk_union_reject


class TopKUnion:
    """The official rule (``TEST.FAST_INFERENCE``, ``TEST.TOPK k``; the paper uses k = 8): the union
    over the pixels of each pixel's k classes with the largest aux logit."""

    def __init__(self, k: int):
        check_topk(k, what="cer_topk")
        self.k = k

    def keep_mask(self, aux_logits: torch.Tensor) -> torch.Tensor:
        """The official argsort + bincount; over the whole batch, as the official code (batch 1)."""
        num_classes = aux_logits.shape[1]
        top = torch.argsort(aux_logits, dim=1, descending=True)[:, :self.k].reshape(-1)
        return torch.bincount(top, minlength=num_classes) > 0

    def select(self, aux_logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        _, flat_idx, class_offsets = topk_union_reject(aux_logits, self.k)
        return flat_idx, class_offsets

    def keep_mask_padded(self, aux_logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The same union with static shapes (export): aux logits (rows, h, w) of one image whose
        rows are real where ``valid`` (rows,) is True -> (rows,) bool, a subset of ``valid``. A tie
        at the k-th value keeps both classes, where the official argsort keeps one of them."""
        aux_logits = aux_logits.masked_fill(~valid[:, None, None], float("-inf"))
        kth = aux_logits.topk(min(self.k, aux_logits.shape[0]), dim=0).values[-1]  # each pixel's k-th largest
        return valid & (aux_logits >= kth).flatten(1).any(dim=1)

    def __repr__(self) -> str:
        return f"TopKUnion(k={self.k})"


def rule_for_topk(cer_topk: Optional[int]) -> Optional[TopKUnion]:
    """``cer_topk`` (None: exact decoding) as a rule."""
    return None if cer_topk is None else TopKUnion(cer_topk)
