"""The SED decoder ("Aggregator" in the official code), in plain PyTorch.

This is the reference: module names and parameter shapes equal the official ones (so official
checkpoints load key for key) and the forward pass follows the official operation order, so that
outputs agree with the official code to float32 rounding. Shapes in comments are for SED-B at a
768x768 input: cost map 24x24, B images, T classes, P = 80 prompt templates.

The exact path (``forward`` without rejection) is also the training forward, as the official
``conv_decoder``: every class, aux heads on detached inputs, the class attention pooled with the
training pooling passed as ``pooling``. The official branches no released model uses (text
guidance, swin blocks, appearance guidance) are left out.
"""
from __future__ import annotations

from typing import List, Optional, Protocol, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .config import (CORR_GUIDANCE_DIMS, DECODER_DIMS, DECODER_GUIDANCE_PROJ_DIMS, EVAL_POOLING, HIDDEN_DIM,
                      KERNEL_SIZE, NUM_HEADS, NUM_PROMPTS)
from ..kernels.class_attention import linear_attention


class RejectionRule(Protocol):
    """What the decoders ask of a category early rejection rule (:mod:`sed_fast.models.rejection`
    has the official one, ``TopKUnion``); the model hands its rule to the decoder with each call."""

    def keep_mask(self, aux_logits: torch.Tensor) -> torch.Tensor:
        """Aux logits (1, T, h, w) of one image -> (T,) bool: the classes that go on (reference decoder)."""

    def select(self, aux_logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Aux logits (B, T, h, w), ``-inf`` for classes rejected earlier -> (flat_idx, class_offsets)
        on the device (fast decoder)."""

    def keep_mask_padded(self, aux_logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Aux logits (rows, h, w) of one image, real rows where ``valid`` -> (rows,) bool, with static
        shapes (:meth:`SEDDecoder.rejecting_with_budget`, export)."""


class ConvNextBlock(nn.Module):
    """ConvNeXt block: 9x9 depthwise conv, channels-last LayerNorm (eps 1e-6), MLP, gamma, residual."""

    def __init__(self, dim: int, kernel_size: int = KERNEL_SIZE):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))  # layer scale, initialised to 1.0 in SED

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.dwconv(x).permute(0, 2, 3, 1)  # (N, H, W, C)
        branch = self.pwconv2(self.act(self.pwconv1(self.norm(branch))))
        branch = self.gamma * branch
        return x + branch.permute(0, 3, 1, 2)


class AttentionLayer(nn.Module):
    """q, k, v projections around :func:`linear_attention` (text guidance is off in SED)."""

    def __init__(self, dim: int, num_heads: int = NUM_HEADS):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (N, L, C); ``valid``: optional (L,) bool, the real positions (see :func:`linear_attention`)."""
        n, length, dim = x.shape
        heads = self.num_heads
        q = self.q(x).view(n, length, heads, dim // heads)
        k = self.k(x).view(n, length, heads, dim // heads)
        v = self.v(x).view(n, length, heads, dim // heads)
        return linear_attention(q, k, v, valid=valid).reshape(n, length, dim)


class ClassTransformerLayer(nn.Module):
    """Attention across the classes at each (pooled) pixel, then an MLP; both with residuals.

    Returns ``x + upsample(branch)`` where the branch carries its own residuals, so with pooling
    (1, 1) this is ``2x + attention + MLP`` terms, exactly as in the official code.
    """

    def __init__(self, dim: int, num_heads: int = NUM_HEADS, pooling_size: Sequence[int] = EVAL_POOLING):
        super().__init__()
        self.pool = nn.AvgPool2d(tuple(pooling_size))
        self.attention = AttentionLayer(dim, num_heads)
        self.MLP = nn.Sequential(nn.Linear(dim, dim * 4), nn.ReLU(), nn.Linear(dim * 4, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, batch: int, pooling: Optional[Sequence[int]] = None,
                valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B*T, C, H, W), class-major within each image (index b*T + t). ``pooling``: the
        average-pooling window instead of the module's own (training pools (2, 2)). ``valid``:
        optional (T,) bool, the real classes of padded rows (batch 1; see :func:`linear_attention`)."""
        bt, dim, height, width = x.shape
        classes = bt // batch
        pooled = self.pool(x) if pooling is None else F.avg_pool2d(x, tuple(pooling))
        ph, pw = pooled.shape[-2:]
        # (B T) C h w -> (B h w) T C: one sequence over the classes per pooled pixel
        seq = pooled.view(batch, classes, dim, ph, pw).permute(0, 3, 4, 1, 2).reshape(batch * ph * pw, classes, dim)
        seq = seq + self.attention(self.norm1(seq), valid)
        seq = seq + self.MLP(self.norm2(seq))
        branch = seq.view(batch, ph, pw, classes, dim).permute(0, 3, 4, 1, 2).reshape(bt, dim, ph, pw)
        branch = F.interpolate(branch, size=(height, width), mode="bilinear", align_corners=True)
        return x + branch


class DoubleConv(nn.Module):
    """(3x3 conv without bias -> GroupNorm(out/16 groups) -> ReLU) x 2."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(out_channels // 16, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(out_channels // 16, out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Up(nn.Module):
    """One gradual-fusion decoder layer: ConvNeXt block, class attention, 2x up, fuse guidance."""

    def __init__(self, in_channels: int, out_channels: int, guidance_channels: int,
                 num_heads: int = NUM_HEADS, pooling_size: Sequence[int] = EVAL_POOLING,
                 kernel_size: int = KERNEL_SIZE):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels - guidance_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels + guidance_channels, out_channels)
        self.cnext = ConvNextBlock(in_channels, kernel_size)
        self.attention = ClassTransformerLayer(in_channels, num_heads, pooling_size)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor, corr_guidance: torch.Tensor,
                pooling: Optional[Sequence[int]] = None, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B*T, C, H, W); guidance: (B, g, 2H, 2W) per image; corr_guidance: (B*T, g, 2H, 2W);
        ``pooling``: the class attention's pooling window (default: its own); ``valid``: optional
        (T,) bool, which rows are real classes (batch 1, padded rows: only the class attention mixes rows)."""
        batch = guidance.shape[0]
        x = self.cnext(x)
        x = self.attention(x, batch, pooling, valid)
        x = self.up(x)
        classes = x.shape[0] // batch
        x = torch.cat([x, guidance.repeat_interleave(classes, dim=0), corr_guidance], dim=1)
        return self.conv(x)


class SEDDecoder(nn.Module):
    """The SED decoder. Module and parameter names follow the official ``Aggregator``.

    Args:
        guidance_dims: channels of res4, res3, res2 of the CLIP image encoder
            ((512, 256, 128) for SED-B, (768, 384, 192) for SED-L).
        num_prompts: P, the number of prompt templates (80).
        pooling_size: pooling of the class attention; (1, 1) at evaluation.

    ``activation_checkpointing`` (attribute, default False): while gradients are recorded, each
    gradual-fusion layer (``decoder1..3``) runs under ``torch.utils.checkpoint`` (non-reentrant):
    its activations are recomputed in the backward instead of kept, the same gradients for less
    memory.
    """

    activation_checkpointing = False

    def __init__(self, guidance_dims: Sequence[int] = (512, 256, 128), num_prompts: int = NUM_PROMPTS,
                 pooling_size: Sequence[int] = EVAL_POOLING):
        super().__init__()
        self.conv1 = nn.Conv2d(num_prompts, HIDDEN_DIM, kernel_size=7, stride=1, padding=3)
        self.decoder_guidance_projection = nn.ModuleList([
            nn.Sequential(nn.Conv2d(d, dp, kernel_size=3, stride=1, padding=1), nn.ReLU())
            for d, dp in zip(guidance_dims, DECODER_GUIDANCE_PROJ_DIMS)
        ])
        corr_dims = (num_prompts,) + tuple(CORR_GUIDANCE_DIMS[1:])
        self.decoder_corr_guidance_projection = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(d, dp, kernel_size=2, stride=2), nn.ReLU())
            for d, dp in zip(corr_dims, DECODER_GUIDANCE_PROJ_DIMS)
        ])
        in_dims = (HIDDEN_DIM,) + DECODER_DIMS[:2]
        self.decoder1 = Up(in_dims[0], DECODER_DIMS[0], DECODER_GUIDANCE_PROJ_DIMS[0], pooling_size=pooling_size)
        self.decoder2 = Up(in_dims[1], DECODER_DIMS[1], DECODER_GUIDANCE_PROJ_DIMS[1], pooling_size=pooling_size)
        self.decoder3 = Up(in_dims[2], DECODER_DIMS[2], DECODER_GUIDANCE_PROJ_DIMS[2], pooling_size=pooling_size)
        self.head0 = nn.Conv2d(HIDDEN_DIM, 1, kernel_size=3, stride=1, padding=1)
        self.head1 = nn.Conv2d(DECODER_DIMS[0], 1, kernel_size=3, stride=1, padding=1)
        self.head2 = nn.Conv2d(DECODER_DIMS[1], 1, kernel_size=3, stride=1, padding=1)
        self.head = nn.Conv2d(DECODER_DIMS[2], 1, kernel_size=3, stride=1, padding=1)

    # -- stages -----------------------------------------------------------------------------
    @staticmethod
    def cost_map(img_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (B, D, h, w) x (T, P, D) -> (B, P, T, h, w), as the official einsum."""
        batch = img_feats.shape[0]
        img = F.normalize(img_feats, dim=1)
        text = F.normalize(text_feats, dim=-1).unsqueeze(0).expand(batch, *text_feats.shape)
        # The official code also computes clamp(logit_scale.exp(), 100) here and never applies it.
        return torch.einsum("bchw, btpc -> bpthw", img, text)

    @staticmethod
    def per_class(corr: torch.Tensor) -> torch.Tensor:
        """(B, P, T, h, w) -> (B*T, P, h, w), class-major within each image."""
        b, p, t, h, w = corr.shape
        return corr.permute(0, 2, 1, 3, 4).reshape(b * t, p, h, w)

    def corr_guidance(self, corr_per_class: torch.Tensor) -> List[torch.Tensor]:
        """The cost map through the three ConvTranspose+ReLU: (B*T, 32|16|8, 2h|4h|8h, ...)."""
        out = []
        x = corr_per_class
        for proj in self.decoder_corr_guidance_projection:
            x = proj(x)
            out.append(x)
        return out

    def decoder_guidance(self, res4: torch.Tensor, res3: torch.Tensor, res2: torch.Tensor) -> List[torch.Tensor]:
        """Per-image guidance from the encoder's res4, res3, res2: (B, 32|16|8, ...)."""
        return [proj(g) for proj, g in zip(self.decoder_guidance_projection, (res4, res3, res2))]

    # -- forward ----------------------------------------------------------------------------
    def forward(self, img_feats: torch.Tensor, text_feats: torch.Tensor,
                guidance: Sequence[torch.Tensor], rejection: Optional[RejectionRule] = None,
                pooling: Optional[Sequence[int]] = None):
        """Decode.

        Args:
            img_feats: (B, D, h, w) dense CLIP features (``clip_vis_dense``).
            text_feats: (T, P, D) class embeddings, shared by the batch.
            guidance: (res5, res4, res3, res2) from the image encoder (res5 is unused, as officially).
            rejection: None for exact decoding; a rule for category early rejection (the official
                one: ``TopKUnion(k)`` of :mod:`sed_fast.models.rejection`).
            pooling: the class attention's pooling window for this call (exact decoding only;
                default: the ``pooling_size`` built with). Training passes (2, 2).

        Returns:
            exact: (logits (B, T, 8h, 8w), [aux0 (B,T,h,w), aux1 (B,T,2h,2w), aux2 (B,T,4h,4w)]),
            pre-sigmoid, as the official ``conv_decoder`` (the aux heads read detached inputs: their
            losses train the heads only).
            CER: scores (B, T, 8h, 8w): sigmoid for kept classes, exact zeros for rejected ones.
            Each image keeps its own set (the official code handles batch 1 only; a batch here is
            decoded image by image, so each image's result equals decoding it alone).
        """
        corr_embed, dec_guidance, corr_guid = self._first_stages(img_feats, text_feats, guidance)
        if rejection is None:
            return self._exact(corr_embed, dec_guidance, corr_guid, img_feats.shape[0], pooling)
        if pooling is not None:
            raise ValueError("pooling is an option of exact decoding (training), not of rejection")
        batch = img_feats.shape[0]
        classes = text_feats.shape[0]
        scores = []
        for b in range(batch):
            rows = slice(b * classes, (b + 1) * classes)
            scores.append(self._rejecting(
                corr_embed[rows], [g[b:b + 1] for g in dec_guidance], [c[rows] for c in corr_guid], rejection))
        return torch.cat(scores, dim=0)

    def _first_stages(self, img_feats: torch.Tensor, text_feats: torch.Tensor, guidance: Sequence[torch.Tensor]):
        """Everything before the gradual-fusion layers, for every class: (conv1 of the cost map
        (B*T, 128, h, w), the per-image decoder guidance, the per-class corr guidance)."""
        _, res4, res3, res2 = guidance
        corr = self.per_class(self.cost_map(img_feats, text_feats))
        return self.conv1(corr), self.decoder_guidance(res4, res3, res2), self.corr_guidance(corr)

    def _exact(self, corr_embed, dec_guidance, corr_guid, batch, pooling=None):
        aux = []
        x = corr_embed
        checkpointing = self.activation_checkpointing and torch.is_grad_enabled()
        for layer, head, g, cg in ((self.decoder1, self.head0, dec_guidance[0], corr_guid[0]),
                                   (self.decoder2, self.head1, dec_guidance[1], corr_guid[1]),
                                   (self.decoder3, self.head2, dec_guidance[2], corr_guid[2])):
            aux.append(head(x.detach()).view(batch, -1, *x.shape[-2:]))  # official: aux heads see detached input
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(layer, x, g, cg, pooling, use_reentrant=False)
            else:
                x = layer(x, g, cg, pooling)
        logits = self.head(x).view(batch, -1, *x.shape[-2:])
        return logits, aux

    def _rejecting(self, corr_embed, dec_guidance, corr_guid, rejection: RejectionRule):
        """The official ``fast_conv_decoder`` for one image (B = 1)."""
        classes = corr_embed.shape[0]
        kept_idx = torch.arange(classes, device=corr_embed.device)  # original class of each row
        x = corr_embed
        for i, (layer, head) in enumerate(((self.decoder1, self.head0), (self.decoder2, self.head1),
                                           (self.decoder3, self.head2))):
            aux = head(x).view(1, -1, *x.shape[-2:])
            keep = rejection.keep_mask(aux)
            kept_idx = kept_idx[keep]
            x = layer(x[keep], dec_guidance[i], corr_guid[i][kept_idx])
        logits = self.head(x)
        scores = torch.zeros(1, classes, *logits.shape[-2:], device=logits.device, dtype=logits.dtype)
        scores[0, kept_idx] = logits[:, 0].sigmoid()
        return scores

    def rejecting_with_budget(self, img_feats: torch.Tensor, text_feats: torch.Tensor,
                              guidance: Sequence[torch.Tensor], rule: RejectionRule, budget: int):
        """Category early rejection by ``rule`` (the official one: ``TopKUnion(k)``) with static
        shapes, for export; batch 1. Each step carries exactly ``min(budget, T)`` rows, the kept
        classes in class order then padding, with a mask of which rows are real: only the class
        attention mixes rows, and it ignores the padding.

        Equals ``forward(..., rejection=rule)`` (up to float rounding) whenever the first kept set has
        at most ``budget`` classes (later sets are subsets of it). A larger one is cut to the
        ``budget`` classes with the largest peak aux logit, which is not the official result:
        ``kept_counts[0] > budget`` says that it happened.

        Returns:
            scores (1, T, 8h, 8w): sigmoid for kept classes, exact zeros for the others;
            kept_counts (3,) int64: the size of the kept set at each rejection step.
        """
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be a positive int, got {budget!r}")
        if img_feats.shape[0] != 1:
            raise ValueError(f"rejecting_with_budget decodes one image, got a batch of {img_feats.shape[0]}")
        x, dec_guidance, corr_guid = self._first_stages(img_feats, text_feats, guidance)
        classes = x.shape[0]
        budget = min(budget, classes)
        class_of_row = torch.arange(classes, device=x.device)
        valid = torch.ones(classes, dtype=torch.bool, device=x.device)
        counts = []
        for i, (layer, head) in enumerate(((self.decoder1, self.head0), (self.decoder2, self.head1),
                                           (self.decoder3, self.head2))):
            aux = head(x)[:, 0]  # (rows, h, w)
            keep = rule.keep_mask_padded(aux, valid)
            counts.append(keep.sum())
            peak = aux.flatten(1).amax(dim=1).masked_fill(~keep, float("-inf"))
            rows = peak.topk(budget).indices.sort().values  # every kept class if they fit, in class order
            valid = keep[rows]
            class_of_row = class_of_row[rows]
            x = layer(x.index_select(0, rows), dec_guidance[i], corr_guid[i].index_select(0, class_of_row), valid=valid)
        logits = self.head(x)[:, 0]
        kept_scores = torch.where(valid[:, None, None], logits.sigmoid(), 0.0)
        scores = kept_scores.new_zeros((classes,) + tuple(kept_scores.shape[-2:]))
        scores = scores.index_copy(0, class_of_row, kept_scores)
        return scores[None], torch.stack(counts)
