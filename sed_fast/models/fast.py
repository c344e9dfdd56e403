"""The fast SED: same weights and outputs as the reference, far less work.

Differences from the reference (each one exact up to float rounding):

* Kernels (``sed_fast.kernels``): the fused cosine cost map written straight into the layout
  conv1 reads, the 9x9 depthwise conv fused with its LayerNorm, linear attention across classes
  in one pass, and top-k union rejection on the device.
* Channels-last activations everywhere; convolutions and linears stay on cuDNN / cuBLAS.
* Corr guidance (the ConvTranspose chain up to 8x the cost map's size) is computed only for the
  classes still kept at that layer, not for all T.
* The per-image decoder guidance is not repeated T times: the first conv of each DoubleConv is
  split into its class-specific input channels and the guidance channels; the guidance part is
  computed once per image and broadcast-added.
* Category early rejection works on batches: each image keeps its own class set (ragged rows,
  ``class_offsets`` as in varlen attention); each image's result equals decoding it alone.
* Memory is bounded whatever the vocabulary: per-class stages run over chunks of classes and the
  class attention over chunks of pixels, sized from a byte budget (``chunk_bytes``).

The only host-device synchronisations in a forward are the reads of the kept-class counts after
each rejection step (and, unless ``validate_inputs=False``, one check that the input is finite).
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..profiling import stage
from .decoder import EVAL_POOLING, Up
from .encoder import CLIP_RESOLUTION, VariantSpec
from .sed import SEDBase, SEDReference

_DEFAULT_CPU_CHUNK_BYTES = 512 << 20


def _chunk_bytes_from_env() -> Optional[int]:
    value = os.environ.get("SED_FAST_CHUNK_MB")
    if not value:
        return None
    try:
        megabytes = float(value)
    except ValueError:
        raise ValueError(f"SED_FAST_CHUNK_MB must be a number of megabytes, got {value!r}") from None
    if megabytes <= 0:
        raise ValueError(f"SED_FAST_CHUNK_MB must be positive, got {value!r}")
    return int(megabytes * (1 << 20))


class _Rows:
    """Which classes the decoder's rows hold: rows are grouped by image (ragged after rejection).

    ``ids`` (device, int64): global class id b*T + t of each row, or None when all B*T rows are
    present in order. ``offsets`` (host list, B+1 ints): rows of image b are offsets[b]:offsets[b+1].
    ``offsets_device``: the same on the device (int32), as class_attention reads it.
    """

    def __init__(self, batch: int, classes: int, device: torch.device):
        self.batch, self.classes = batch, classes
        self.ids: Optional[torch.Tensor] = None
        self.offsets: List[int] = [b * classes for b in range(batch + 1)]
        self.offsets_device = torch.tensor(self.offsets, dtype=torch.int32, device=device)

    @property
    def count(self) -> int:
        return self.offsets[-1]

    def segments(self, start: int, stop: int):
        """(image, first row, end row) of each image's rows inside rows [start, stop)."""
        for b in range(self.batch):
            lo, hi = max(start, self.offsets[b]), min(stop, self.offsets[b + 1])
            if lo < hi:
                yield b, lo, hi


class SEDFast(SEDBase):
    """Kernel-backed SED. Build it with ``sed_fast.build_sed(variant, impl="fast", ...)``.

    Extra options:
        chunk_bytes: memory budget of one chunk of per-class (or per-pixel) work. Default: a
            quarter of the free GPU memory (at most 2 GiB) on CUDA, 512 MiB on CPU; the
            environment variable ``SED_FAST_CHUNK_MB`` overrides the default.
        validate_inputs: check that input pixels are finite (one host sync per forward).
        cuda_graphs: on CUDA, capture the image encoder (static shapes) in a CUDA graph per input
            shape and replay it: removes the encoder's launch overhead. The decoder's shapes depend
            on the kept classes, so it is not captured.
    """

    def __init__(self, spec: VariantSpec, *, cer_topk: Optional[int] = None,
                 clip_resolution: int = CLIP_RESOLUTION, text_cache: bool = True, device=None,
                 chunk_bytes: Optional[int] = None, validate_inputs: bool = True,
                 cuda_graphs: bool = False, sem_seg_head: Optional[nn.Module] = None, preprocess: str = "official"):
        super().__init__(spec, cer_topk=cer_topk, clip_resolution=clip_resolution, text_cache=text_cache,
                         pooling_size=EVAL_POOLING, device=device, sem_seg_head=sem_seg_head,
                         preprocess=preprocess)
        if chunk_bytes is not None and (not isinstance(chunk_bytes, int) or chunk_bytes <= 0):
            raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
        pooling = self.decoder.decoder1.attention.pool.kernel_size
        if pooling not in (1, (1, 1)):
            raise ValueError("the fast model implements the evaluation pooling (1, 1) only, "
                             f"this decoder pools with {pooling}")
        self.chunk_bytes = chunk_bytes
        self.validate_inputs = validate_inputs
        self.cuda_graphs = cuda_graphs
        self._encoder_graphs = {}  # (shape, dtype, device) -> (graph, static input, static outputs)
        if sem_seg_head is None:
            self.to(memory_format=torch.channels_last)

    @classmethod
    def from_reference(cls, reference: SEDReference, **options) -> "SEDFast":
        """A fast model that shares ``reference``'s weights (no copy) and vocabulary."""
        fast = cls(reference.spec, cer_topk=reference.cer_topk, clip_resolution=reference.clip_resolution,
                   text_cache=reference.text_cache, sem_seg_head=reference.sem_seg_head,
                   preprocess=reference.preprocess, **options)
        fast.random_weights = getattr(reference, "random_weights", None)
        fast.force_kept_classes = reference.force_kept_classes
        fast._tokenizer = reference._tokenizer
        if reference.text_embeddings is not None:
            fast.text_embeddings = reference.text_embeddings
            fast.class_names = list(reference.class_names)
        return fast

    # -- forward ---------------------------------------------------------------------------------
    @property
    def defer_value_checks(self) -> bool:
        """Pixel values are read after the forward (no early host sync); not at all without
        ``validate_inputs``."""
        return self.validate_inputs

    def segment(self, clip_images: torch.Tensor) -> torch.Tensor:
        text = self._text_for_decoder()
        with stage("image_encoder"):
            dense, features = self._encode(clip_images.contiguous(memory_format=torch.channels_last))
        return self.decode(dense, text, features)

    def _encode(self, images: torch.Tensor):
        """The image encoder, replayed from a CUDA graph when ``cuda_graphs`` is on (CUDA only).

        The returned tensors are the graph's static outputs: valid until the next forward."""
        if not (self.cuda_graphs and images.is_cuda) or torch.cuda.is_current_stream_capturing():
            return self.encode_image(images)
        key = (tuple(images.shape), images.dtype, self.dtype, images.device)
        captured = self._encoder_graphs.get(key)
        if captured is None:
            static_input = images.clone()
            side = torch.cuda.Stream(images.device)
            side.wait_stream(torch.cuda.current_stream(images.device))
            with torch.cuda.stream(side):  # warm-up outside the graph (cuDNN picks its algorithms)
                for _ in range(2):
                    self.encode_image(static_input)
            torch.cuda.current_stream(images.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_output = self.encode_image(static_input)
            captured = self._encoder_graphs[key] = (graph, static_input, static_output)
        graph, static_input, (dense, features) = captured
        static_input.copy_(images)
        graph.replay()
        return dense, features

    def _apply(self, fn, *args, **kwargs):
        self._encoder_graphs = {}  # .to()/.cuda() move the weights the graphs point at
        return super()._apply(fn, *args, **kwargs)

    def decode(self, dense: torch.Tensor, text: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """dense (B, D, h, w), text (T, P, D), features [res2, res3, res4, res5] ->
        scores (B, T, 8h, 8w): sigmoid of the logits, exact zeros for rejected classes."""
        dec = self.decoder
        batch, classes = dense.shape[0], text.shape[0]
        res2, res3, res4, res5 = features
        rejecting = self.cer_topk is not None or self.force_kept_classes is not None
        rows = _Rows(batch, classes, dense.device)
        budget = self._budget(dense.device)  # bytes per chunk of work, decided once per forward

        with stage("cost_map"):
            corr = kernels.cost_map(dense, text.to(dense.dtype), channels_last=True)  # (B*T, P, h, w)
        with stage("conv1"):
            x = dec.conv1(corr)
        with stage("decoder_guidance"):
            guidance = dec.decoder_guidance(res4, res3, res2)

        corr_source = corr  # what the next corr-guidance ConvTranspose reads, row-aligned with x
        layers = ((dec.decoder1, dec.head0), (dec.decoder2, dec.head1), (dec.decoder3, dec.head2))
        for i, (layer, aux_head) in enumerate(layers):
            if rejecting:
                with stage(f"reject{i}"):
                    aux = aux_head(x)
                    selected = self._reject(aux, rows)
                    if selected is not None:
                        x = kernels.gather_rows(x, selected, rows.count)
                        corr_source = kernels.gather_rows(corr_source, selected, rows.count)
            with stage(f"decoder{i + 1}.corr_guidance"):
                corr_source = dec.decoder_corr_guidance_projection[i](corr_source)  # kept rows only
            x = self._up(layer, x, guidance[i], corr_source, rows, f"decoder{i + 1}", budget,
                         final_head=dec.head if i == 2 else None)

        with stage("scatter"):
            logits = x  # (R, 1, 8h, 8w) from the final head
            probabilities = logits[:, 0].float().sigmoid()
            if rows.ids is None:
                return probabilities.view(batch, classes, *probabilities.shape[-2:])
            scores = probabilities.new_zeros(batch * classes, *probabilities.shape[-2:])
            scores.index_copy_(0, rows.ids, probabilities)
            return scores.view(batch, classes, *scores.shape[-2:])

    # -- category early rejection ------------------------------------------------------------------
    def _reject(self, aux: torch.Tensor, rows: _Rows) -> Optional[torch.Tensor]:
        """Reject classes from aux logits (R, 1, h, w); update ``rows``; return the rows to keep
        (indices into the current rows), or None if the rows did not change."""
        batch, classes = rows.batch, rows.classes
        h, w = aux.shape[-2:]
        if rows.ids is None:
            padded = aux.view(batch, classes, h, w)
        else:  # absent classes are -inf: never kept, as if the argsort ran over the kept ones only
            padded = aux.new_full((batch * classes, h, w), float("-inf"))
            padded.index_copy_(0, rows.ids, aux[:, 0])
            padded = padded.view(batch, classes, h, w)
        if self.force_kept_classes is not None:
            flat_idx, offsets_device = _forced_keep(padded, self.force_kept_classes)
        else:
            _, flat_idx, offsets_device = kernels.topk_union_reject(padded, self.cer_topk)
        offsets = offsets_device.tolist()  # the one host sync of this step
        new_ids = flat_idx[: offsets[-1]].long()
        if rows.ids is None:
            selected = new_ids
        else:
            row_of_class = torch.full((batch * classes,), -1, dtype=torch.long, device=aux.device)
            row_of_class[rows.ids] = torch.arange(rows.count, device=aux.device)
            selected = row_of_class[new_ids]
        rows.ids, rows.offsets, rows.offsets_device = new_ids, offsets, offsets_device.to(torch.int32)
        return selected

    # -- one decoder layer ---------------------------------------------------------------------------
    def _up(self, layer: Up, x: torch.Tensor, guidance: torch.Tensor, corr_guidance: torch.Tensor,
            rows: _Rows, name: str, budget: int, final_head: Optional[nn.Conv2d] = None) -> torch.Tensor:
        """One ``Up`` layer on rows x (R, C, H, W) channels-last -> (R, C_out, 2H, 2W), or the
        final head's logits (R, 1, 2H, 2W) when ``final_head`` is given (fused to save memory)."""
        count, channels, height, width = x.shape
        tokens = x.permute(0, 2, 3, 1)  # (R, H, W, C) view; contiguous because x is channels-last
        if not tokens.is_contiguous():
            tokens = tokens.contiguous()

        # ConvNeXt block, per class: chunks of rows bound the 4C-wide MLP activations.
        cnext = layer.cnext
        row_bytes = height * width * channels * x.element_size() * 7
        after_block = torch.empty_like(tokens)
        for start, stop in _chunks(count, row_bytes, budget):
            with stage(f"{name}.dwconv"):
                normed = kernels.dwconv_layernorm(x[start:stop], cnext.dwconv.weight, cnext.dwconv.bias,
                                                  cnext.norm.weight, cnext.norm.bias, cnext.norm.eps)
            with stage(f"{name}.convnext_mlp"):
                hidden = F.gelu(F.linear(normed, cnext.pwconv1.weight, cnext.pwconv1.bias))
                branch = F.linear(hidden, cnext.pwconv2.weight, cnext.pwconv2.bias)
                torch.addcmul(tokens[start:stop], cnext.gamma, branch, out=after_block[start:stop])
        del tokens

        # Class attention, per pixel across the classes: chunks of pixels bound q, k, v.
        with stage(f"{name}.class_attention"):
            attended = self._class_attention(layer, after_block.view(count, height * width, channels),
                                             rows, budget)
        del after_block
        x = attended.view(count, height, width, channels).permute(0, 3, 1, 2)  # channels-last view

        # Up-sampling and DoubleConv, per class: chunks of rows.
        double_conv = layer.conv.double_conv
        conv_a, norm_a, conv_b, norm_b = double_conv[0], double_conv[1], double_conv[3], double_conv[4]
        up_channels = layer.up.out_channels
        guide_channels = guidance.shape[1]
        # Split the first conv by input channels: [upsampled x | image guidance | corr guidance].
        weight_class = torch.cat([conv_a.weight[:, :up_channels], conv_a.weight[:, up_channels + guide_channels:]], 1)
        weight_guide = conv_a.weight[:, up_channels:up_channels + guide_channels]
        with stage(f"{name}.double_conv"):
            shared = F.conv2d(guidance, weight_guide, padding=1)  # (B, C_out, 2H, 2W), once per image
        out_channels = final_head.out_channels if final_head is not None else conv_b.out_channels
        out = torch.empty(count, out_channels, 2 * height, 2 * width, device=x.device, dtype=x.dtype,
                          memory_format=torch.channels_last)
        row_bytes = 4 * height * width * (up_channels + 2 * corr_guidance.shape[1] + 4 * conv_a.out_channels) * x.element_size()
        for start, stop in _chunks(count, row_bytes, budget):
            with stage(f"{name}.upsample"):
                up = layer.up(x[start:stop])
            with stage(f"{name}.double_conv"):
                y = F.conv2d(torch.cat([up, corr_guidance[start:stop]], 1), weight_class, padding=1)
                del up
                for b, lo, hi in rows.segments(start, stop):
                    y[lo - start:hi - start] += shared[b]
                y = F.relu(norm_a(y), inplace=True)
                y = F.relu(norm_b(conv_b(y)), inplace=True)
            if final_head is not None:
                with stage("head"):
                    y = final_head(y)
            out[start:stop] = y
        return out

    def _class_attention(self, layer: Up, seq: torch.Tensor, rows: _Rows, budget: int) -> torch.Tensor:
        """The ClassTransformerLayer with pooling (1, 1): ``2x + attention + MLP`` terms, per pixel.

        seq: (R, P, C) tokens of the rows (pixels P = H*W). Returns a new (R, P, C) tensor.
        """
        ctl = layer.attention
        attn = ctl.attention
        count, pixels, channels = seq.shape
        qkv_weight = torch.cat([attn.q.weight, attn.k.weight, attn.v.weight], 0)  # one GEMM for q, k, v
        qkv_bias = torch.cat([attn.q.bias, attn.k.bias, attn.v.bias], 0)
        out = torch.empty_like(seq)
        pixel_bytes = count * channels * seq.element_size() * 12
        for start, stop in _chunks(pixels, pixel_bytes, budget):
            x = seq[:, start:stop]
            qkv = F.linear(F.layer_norm(x, (channels,), ctl.norm1.weight, ctl.norm1.bias, ctl.norm1.eps),
                           qkv_weight, qkv_bias)
            q, k, v = qkv.split(channels, dim=-1)
            branch = x + kernels.class_attention(q, k, v, rows.offsets_device, num_heads=attn.num_heads)
            del qkv, q, k, v
            mlp = ctl.MLP
            hidden = F.relu(F.linear(F.layer_norm(branch, (channels,), ctl.norm2.weight, ctl.norm2.bias,
                                                  ctl.norm2.eps), mlp[0].weight, mlp[0].bias))
            branch = branch + F.linear(hidden, mlp[2].weight, mlp[2].bias)
            torch.add(x, branch, out=out[:, start:stop])
        return out

    def _budget(self, device: torch.device) -> int:
        if self.chunk_bytes is not None:
            return self.chunk_bytes
        from_env = _chunk_bytes_from_env()
        if from_env is not None:
            return from_env
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return max(64 << 20, min(2 << 30, free // 4))
        return _DEFAULT_CPU_CHUNK_BYTES


def _chunks(total: int, bytes_per_item: int, budget: int):
    """[start, stop) ranges over ``total`` items, each within ``budget`` bytes (at least one item)."""
    step = max(1, budget // max(1, bytes_per_item))
    for start in range(0, total, step):
        yield start, min(total, start + step)


def _forced_keep(padded: torch.Tensor, num_kept: int):
    """Benchmark rule (see ``decoder.forced_keep``), per image: the ``num_kept`` classes whose best
    pixel scores highest among the classes still present. Returns (flat_idx, class_offsets)."""
    batch, classes = padded.shape[:2]
    best = padded.flatten(2).amax(dim=2)  # (B, T); -inf for absent classes
    keep = torch.zeros_like(best, dtype=torch.bool)
    keep.scatter_(1, best.topk(min(num_kept, classes), dim=1).indices, True)
    keep &= best > float("-inf")
    flat_idx = keep.flatten().nonzero()[:, 0].to(torch.int32)
    offsets = torch.zeros(batch + 1, dtype=torch.int32, device=padded.device)
    offsets[1:] = keep.sum(1).cumsum(0)
    return flat_idx, offsets
