"""The fast decoder layers: the reference modules with kernel-backed forwards.

Each fast layer is a subclass of the reference module it replaces, built from an existing one by
``from_reference``: it adopts the reference module's parameters and sub-modules (the same tensors,
under the same names, in the same order), so the state dict is the official one and a fast model
built from a reference shares its weights. Only ``forward`` differs, with the same result up to
float rounding:

* :class:`FastConvNextBlock`: the 9x9 depthwise conv and the channels-last LayerNorm are one kernel
  (``dwconv_layernorm``), the MLP runs over chunks of class rows.
* :class:`FastClassTransformerLayer`: q, k, v from one GEMM (the fused weight is prepared once),
  the linear attention across classes in one kernel over ragged per-image class segments
  (``class_attention``), over chunks of pixels; pooling (1, 1) (evaluation) or any window passed
  per call (training pools (2, 2): pool, attend, upsample, add).
* :class:`FastUp`: the first conv of DoubleConv is split into its class-specific input channels and
  the per-image guidance channels; the guidance part runs once per image and is broadcast-added,
  instead of convolving the guidance repeated T times.
* :class:`FastDecoder`: the decoder in the order of the paper's Figure 2 (cost map, conv1, then
  three gradual-fusion layers with category early rejection between them), on a ragged set of
  class rows per image (:class:`ClassRows`).

Activations are channels-last throughout; convolutions and linears stay on cuDNN / cuBLAS. On CPU
the float32 linears go through oneDNN (:mod:`sed_fast.kernels.cpu_linear`) and the MLPs run over
cache-sized pieces of tokens (:func:`token_pieces`).

Training (:meth:`FastDecoder.logits`) runs the same layers while autograd records: the chunks are
then concatenated instead of written into a preallocated output (``out=`` is not differentiable),
and an op without a registered backward is replaced by its plain PyTorch reference (same values).
"""
from __future__ import annotations

import sys
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.utils.checkpoint
import torch.nn as nn
import torch.nn.functional as F

from ... import kernels
from ...kernels import cpu_linear
from ...base.stages import stage
from ..decoder import ClassTransformerLayer, ConvNextBlock, RejectionRule, SEDDecoder, Up


# -------------------------------------------------------------------------------------------------
# Building fast layers from reference ones
# -------------------------------------------------------------------------------------------------
def _adopt(fast: nn.Module, reference: nn.Module, **replace: nn.Module) -> None:
    """Give ``fast`` the parameters, buffers and sub-modules of ``reference`` (the same objects,
    names and order; ``replace`` swaps named sub-modules for their fast versions)."""
    for name, parameter in reference._parameters.items():
        fast.register_parameter(name, parameter)
    for name, buffer in reference._buffers.items():
        fast.register_buffer(name, buffer, persistent=name not in reference._non_persistent_buffers_set)
    for name, module in reference._modules.items():
        fast.add_module(name, replace.get(name, module))
    fast.train(reference.training)


def _blank(cls):
    """An instance of ``cls`` with an empty nn.Module state (its reference ``__init__`` not run:
    the parameters come from the module it is built from)."""
    instance = cls.__new__(cls)
    nn.Module.__init__(instance)
    return instance


class DerivedWeight:
    """A tensor computed from parameters (a fused or split weight), kept until one of them changes:
    in place (``load_state_dict``), or replaced / moved (``.to()``, ``.half()``)."""

    def __init__(self, compute: Callable[..., torch.Tensor]):
        self._compute = compute
        self._key: Optional[tuple] = None
        self._value = None

    def __call__(self, *parameters: torch.Tensor):
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in parameters)
        if key != self._key:
            with torch.no_grad():
                self._value = self._compute(*parameters)
            self._key = key
        return self._value


def chunks(total: int, bytes_per_item: int, budget: int):
    """[start, stop) ranges over ``total`` items, each within ``budget`` bytes (at least one item)."""
    step = max(1, budget // max(1, bytes_per_item))
    for start in range(0, total, step):
        yield start, min(total, start + step)


#: On CPU the MLPs run over pieces of tokens holding at most this many bytes of hidden activations:
#: the hidden layer then stays in cache between its two matmuls (3x faster here than a hidden
#: layer the size of a whole chunk, which goes to memory and back twice).
CPU_MLP_HIDDEN_BYTES = 4 << 20


def token_pieces(tokens: int, hidden_channels: int, element_size: int, device: torch.device):
    """[start, stop) ranges over ``tokens`` rows for an MLP of ``hidden_channels``: one range off
    the CPU (a GPU wants one large matmul), cache-sized pieces on it."""
    if device.type != "cpu":
        return [(0, tokens)]
    return list(chunks(tokens, hidden_channels * element_size, CPU_MLP_HIDDEN_BYTES))


def _op(name: str, dtype: torch.dtype) -> Callable:
    """``kernels.<name>``, or its plain PyTorch reference (``kernels.<name>_reference``, same
    values) for float64 (gradient checks: the ops take 16/32-bit floats) and while autograd
    records and the op has no backward registered."""
    if dtype == torch.float64:
        return getattr(kernels, f"{name}_reference")
    if torch.is_grad_enabled():
        op = getattr(sys.modules[f"{kernels.__name__}.{name}"], f"_{name}_op", None)
        if getattr(op, "_backward_fn", None) is None:
            return getattr(kernels, f"{name}_reference")
    return getattr(kernels, name)


def _recording(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an op on ``tensors`` (then chunks are concatenated, not written out=)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _is_unit_pooling(pooling) -> bool:
    return pooling is None or tuple(pooling) in ((1, 1), (1,)) or pooling == 1


# -------------------------------------------------------------------------------------------------
# Ragged class rows
# -------------------------------------------------------------------------------------------------
class ClassRows:
    """Which classes the decoder's rows hold: rows are grouped by image (ragged after rejection).

    ``ids`` (device, int64): global class id b*T + t of each row, or None while all B*T rows are
    present in order. ``offsets`` (host list, B+1 ints): the rows of image b are
    offsets[b]:offsets[b+1]; ``offsets_device``: the same on the device (int32), as the class
    attention kernel reads it.
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

    def reject(self, aux: torch.Tensor, rule: RejectionRule) -> torch.Tensor:
        """Apply ``rule`` to the aux logits (R, 1, h, w) of the current rows; update the rows;
        return which current rows are kept (indices into them). Reads the kept counts: the one
        host sync of a rejection step."""
        batch, classes = self.batch, self.classes
        h, w = aux.shape[-2:]
        if self.ids is None:
            padded = aux.view(batch, classes, h, w)
        else:  # absent classes are -inf: never kept, as if the rule saw the kept ones only
            padded = aux.new_full((batch * classes, h, w), float("-inf"))
            padded.index_copy_(0, self.ids, aux[:, 0])
            padded = padded.view(batch, classes, h, w)
        flat_idx, offsets_device = rule.select(padded)
        offsets = offsets_device.tolist()
        new_ids = flat_idx[: offsets[-1]].long()
        if self.ids is None:
            selected = new_ids
        else:
            row_of_class = torch.full((batch * classes,), -1, dtype=torch.long, device=aux.device)
            row_of_class[self.ids] = torch.arange(self.count, device=aux.device)
            selected = row_of_class[new_ids]
        self.ids, self.offsets, self.offsets_device = new_ids, offsets, offsets_device.to(torch.int32)
        return selected


# -------------------------------------------------------------------------------------------------
# The layers
# -------------------------------------------------------------------------------------------------
class FastConvNextBlock(ConvNextBlock):
    """ConvNeXt block: fused depthwise conv + LayerNorm kernel, then the MLP, gamma and residual."""

    @classmethod
    def from_reference(cls, block: ConvNextBlock) -> "FastConvNextBlock":
        fast = _blank(cls)
        _adopt(fast, block)
        return fast

    def forward(self, x: torch.Tensor, budget: int, name: str = "cnext") -> torch.Tensor:
        """x (R, C, H, W) channels-last -> (R, H, W, C) tokens (a new tensor)."""
        count, channels, height, width = x.shape
        tokens = x.permute(0, 2, 3, 1)  # a view: contiguous because x is channels-last
        if not tokens.is_contiguous():
            tokens = tokens.contiguous()
        recording = _recording(x, self.gamma)
        out = None if recording else torch.empty_like(tokens)
        pieces = []
        dwconv_layernorm = _op("dwconv_layernorm", x.dtype)
        # Under autocast x is 16-bit and the parameters float32: the op takes one dtype (a
        # differentiable cast, as autocast itself casts a convolution's weight).
        params = [p if p.dtype == x.dtype else p.to(x.dtype)
                  for p in (self.dwconv.weight, self.dwconv.bias, self.norm.weight, self.norm.bias)]
        row_bytes = height * width * channels * x.element_size() * 7  # normed, 4C hidden, branch
        for start, stop in chunks(count, row_bytes, budget):
            with stage(f"{name}.dwconv"):
                normed = dwconv_layernorm(x[start:stop], *params, self.norm.eps)
            with stage(f"{name}.convnext_mlp"):
                if recording:
                    pieces.append(torch.addcmul(tokens[start:stop], self.gamma, self._mlp_branch(normed)))
                    continue
                rows_in = normed.view(-1, channels)
                rows_residual, rows_out = tokens[start:stop].view(-1, channels), out[start:stop].view(-1, channels)
                for lo, hi in token_pieces(rows_in.shape[0], self.pwconv1.out_features, x.element_size(), x.device):
                    torch.addcmul(rows_residual[lo:hi], self.gamma, self._mlp_branch(rows_in[lo:hi]),
                                  out=rows_out[lo:hi])
        return torch.cat(pieces) if recording else out

    def _mlp_branch(self, normed: torch.Tensor) -> torch.Tensor:
        """pwconv2(gelu(pwconv1(normed))), before the gamma scale."""
        hidden = F.gelu(cpu_linear.linear(normed, self.pwconv1.weight, self.pwconv1.bias))
        return cpu_linear.linear(hidden, self.pwconv2.weight, self.pwconv2.bias)


def _fused_qkv(q_weight, q_bias, k_weight, k_bias, v_weight, v_bias) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([q_weight, k_weight, v_weight], 0), torch.cat([q_bias, k_bias, v_bias], 0)


class FastClassTransformerLayer(ClassTransformerLayer):
    """Class attention: at pooling (1, 1) ``2x + attention + MLP`` terms at every pixel, the linear
    attention across each image's classes in one kernel; other pooling windows (passed to
    :class:`FastUp`) pool, run the same branch on the pooled pixels, upsample and add."""

    @classmethod
    def from_reference(cls, layer: ClassTransformerLayer) -> "FastClassTransformerLayer":
        if layer.pool.kernel_size not in (1, (1, 1)):
            raise ValueError("the fast model is built with the evaluation pooling (1, 1) (training passes its "
                             f"pooling per call); this decoder pools with {layer.pool.kernel_size}")
        fast = _blank(cls)
        _adopt(fast, layer)
        fast._qkv = DerivedWeight(_fused_qkv)
        return fast

    def forward(self, seq: torch.Tensor, class_offsets: torch.Tensor, budget: int,
                residual: bool = True) -> torch.Tensor:
        """seq (R, P, C): the tokens of R class rows at P pixels; ``class_offsets`` (B+1,) int32 on
        the device: the rows of each image. Returns a new (R, P, C) tensor: ``seq + branch``, or
        with ``residual=False`` the branch alone (``seq + attention + MLP``)."""
        attn = self.attention
        count, pixels, channels = seq.shape
        # Under autograd the fused weight must be part of the graph: concatenated per call.
        recording = _recording(seq, attn.q.weight)
        fuse = _fused_qkv if recording else self._qkv
        qkv_weight, qkv_bias = fuse(attn.q.weight, attn.q.bias, attn.k.weight, attn.k.bias,
                                    attn.v.weight, attn.v.bias)
        class_attention = _op("class_attention", seq.dtype)
        out = None if recording else torch.empty_like(seq)
        pieces = []
        pixel_bytes = count * channels * seq.element_size() * 12  # qkv, attention out, MLP hidden
        for start, stop in chunks(pixels, pixel_bytes, budget):
            x = seq[:, start:stop]
            normed = F.layer_norm(x, (channels,), self.norm1.weight, self.norm1.bias, self.norm1.eps)
            qkv = cpu_linear.linear(normed, qkv_weight, qkv_bias)
            del normed
            q, k, v = qkv.split(channels, dim=-1)
            branch = x + class_attention(q, k, v, class_offsets, num_heads=attn.num_heads)
            del qkv, q, k, v
            if recording:
                branch = branch + self._mlp_branch(branch)
                pieces.append(x + branch if residual else branch)
                continue
            rows = branch.view(-1, channels)  # the MLP in place, over cache-sized pieces on CPU
            for lo, hi in token_pieces(rows.shape[0], self.MLP[0].out_features, seq.element_size(), seq.device):
                rows[lo:hi] += self._mlp_branch(rows[lo:hi])
            if residual:
                torch.add(x, branch, out=out[:, start:stop])
            else:
                out[:, start:stop] = branch
        return torch.cat(pieces, 1) if recording else out

    def _mlp_branch(self, tokens: torch.Tensor) -> torch.Tensor:
        """MLP(norm2(tokens)), the second residual branch."""
        normed = F.layer_norm(tokens, (tokens.shape[-1],), self.norm2.weight, self.norm2.bias, self.norm2.eps)
        hidden = F.relu(cpu_linear.linear(normed, self.MLP[0].weight, self.MLP[0].bias))
        return cpu_linear.linear(hidden, self.MLP[2].weight, self.MLP[2].bias)


class FastUp(Up):
    """One gradual-fusion layer: ConvNeXt block, class attention, 2x up-sampling, guidance fusion."""

    @classmethod
    def from_reference(cls, layer: Up, name: str) -> "FastUp":
        fast = _blank(cls)
        _adopt(fast, layer, cnext=FastConvNextBlock.from_reference(layer.cnext),
               attention=FastClassTransformerLayer.from_reference(layer.attention))
        fast.name = name  # the stage names' prefix, e.g. "decoder1"
        fast._split = DerivedWeight(fast._split_first_conv)
        return fast

    def _split_first_conv(self, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """DoubleConv's first weight by input channels [upsampled x | image guidance | corr guidance]:
        (weight over x and corr guidance, weight over the image guidance)."""
        up_channels = self.up.out_channels
        guide_channels = weight.shape[1] - up_channels - self.corr_channels
        class_part = torch.cat([weight[:, :up_channels], weight[:, up_channels + guide_channels:]], 1)
        return class_part, weight[:, up_channels:up_channels + guide_channels]

    @property
    def corr_channels(self) -> int:
        """Channels of the corr guidance: those of the image guidance (both are ``g``)."""
        return self.conv.double_conv[0].in_channels - self.up.in_channels

    def forward(self, x: torch.Tensor, guidance: torch.Tensor, corr_guidance: torch.Tensor, rows: ClassRows,
                budget: int, final_head: Optional[nn.Conv2d] = None,
                pooling: Optional[Sequence[int]] = None) -> torch.Tensor:
        """x (R, C, H, W) channels-last rows; guidance (B, g, 2H, 2W) per image; corr_guidance
        (R, g, 2H, 2W) per row -> (R, C_out, 2H, 2W) channels-last, or the final head's logits
        (R, 1, 2H, 2W) when ``final_head`` is given (applied per chunk: the 16-channel output of
        the last layer is never held for all rows). ``pooling``: the class attention's pooling
        window (default (1, 1))."""
        count, channels, height, width = x.shape
        tokens = self.cnext(x, budget, self.name)  # (R, H, W, C)
        with stage(f"{self.name}.class_attention"):
            if _is_unit_pooling(pooling):
                attended = self.attention(tokens.view(count, height * width, channels), rows.offsets_device, budget)
                x = attended.view(count, height, width, channels).permute(0, 3, 1, 2)  # channels-last view
            else:  # as the reference: x + upsample(branch(pool(x))), align_corners=True
                grid = tokens.permute(0, 3, 1, 2)  # channels-last view
                pooled = F.avg_pool2d(grid, tuple(pooling))
                ph, pw = pooled.shape[-2:]
                seq = pooled.permute(0, 2, 3, 1).reshape(count, ph * pw, channels)
                branch = self.attention(seq, rows.offsets_device, budget, residual=False)
                branch = branch.view(count, ph, pw, channels).permute(0, 3, 1, 2)
                x = grid + F.interpolate(branch, size=(height, width), mode="bilinear", align_corners=True)
        del tokens

        conv_a, norm_a = self.conv.double_conv[0], self.conv.double_conv[1]
        conv_b, norm_b = self.conv.double_conv[3], self.conv.double_conv[4]
        # Under autograd the split weights must be part of the graph: split per call.
        split = self._split_first_conv if _recording(x, conv_a.weight) else self._split
        weight_class, weight_guide = split(conv_a.weight)
        with stage(f"{self.name}.double_conv"):
            shared = F.conv2d(guidance, weight_guide, padding=1)  # (B, C_out, 2H, 2W): once per image
        out_channels = final_head.out_channels if final_head is not None else conv_b.out_channels
        out = torch.empty(count, out_channels, 2 * height, 2 * width, device=x.device, dtype=x.dtype,
                          memory_format=torch.channels_last)
        row_bytes = 4 * height * width * x.element_size() * (
            self.up.out_channels + 2 * corr_guidance.shape[1] + 4 * conv_a.out_channels)
        for start, stop in chunks(count, row_bytes, budget):
            with stage(f"{self.name}.upsample"):
                up = self.up(x[start:stop])
            with stage(f"{self.name}.double_conv"):
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


class FastDecoder(SEDDecoder):
    """The SED decoder with fast layers; the reference decoder's parameters, shared.

    ``forward`` returns scores (sigmoid of the logits, exact zeros for rejected classes) for exact
    decoding and rejection alike; the aux heads run only where a rejection step reads them.
    """

    @classmethod
    def from_reference(cls, decoder: SEDDecoder) -> "FastDecoder":
        fast = _blank(cls)
        _adopt(fast, decoder, **{name: FastUp.from_reference(getattr(decoder, name), name)
                                 for name in ("decoder1", "decoder2", "decoder3")})
        return fast

    def forward(self, img_feats: torch.Tensor, text_feats: torch.Tensor, guidance: Sequence[torch.Tensor],
                rejection: Optional[RejectionRule] = None, budget: int = 512 << 20) -> torch.Tensor:
        """img_feats (B, D, h, w), text_feats (T, P, D), guidance (res5, res4, res3, res2) ->
        scores (B, T, 8h, 8w) float32. ``budget``: bytes of one chunk of per-class work."""
        x, _, rows = self._decode(img_feats, text_feats, guidance, rejection, budget)
        batch, classes = rows.batch, rows.classes
        with stage("scatter"):
            probabilities = x[:, 0].float().sigmoid()  # x: the final head's logits (R, 1, 8h, 8w)
            if rows.ids is None:
                return probabilities.view(batch, classes, *probabilities.shape[-2:])
            scores = probabilities.new_zeros(batch * classes, *probabilities.shape[-2:])
            scores.index_copy_(0, rows.ids, probabilities)
            return scores.view(batch, classes, *scores.shape[-2:])

    def logits(self, img_feats: torch.Tensor, text_feats: torch.Tensor, guidance: Sequence[torch.Tensor],
               pooling: Optional[Sequence[int]] = None, budget: int = 512 << 20) -> List[torch.Tensor]:
        """The training outputs, as the reference decoder's exact path: [final logits (B, T, 8h,
        8w), aux logits after conv1 (B, T, h, w), after decoder1 (2h), after decoder2 (4h)], every
        class, the aux heads on detached inputs; ``pooling``: the class attention's window."""
        final, aux, rows = self._decode(img_feats, text_feats, guidance, None, budget, pooling=pooling, with_aux=True)
        return [final.view(rows.batch, rows.classes, *final.shape[-2:]), *aux]

    def _decode(self, img_feats, text_feats, guidance, rejection, budget, pooling=None, with_aux=False):
        """The decoder up to the final head: (logits (R, 1, 8h, 8w), aux logits (with_aux), rows)."""
        _, res4, res3, res2 = guidance
        batch, classes = img_feats.shape[0], text_feats.shape[0]
        rows = ClassRows(batch, classes, img_feats.device)
        # Paper Fig. 2: cosine cost map -> conv1 (per class) -> three gradual-fusion layers, with
        # category early rejection before each one.
        with stage("cost_map"):
            cost_map = _op("cost_map", img_feats.dtype)
            corr = cost_map(img_feats, text_feats.to(img_feats.dtype), channels_last=True)  # (B*T, P, h, w)
        with stage("conv1"):
            x = self.conv1(corr)
        with stage("decoder_guidance"):
            image_guidance = self.decoder_guidance(res4, res3, res2)

        aux = []
        checkpointing = self.activation_checkpointing and torch.is_grad_enabled()
        corr_source = corr  # what the next corr-guidance ConvTranspose reads, row-aligned with x
        layers = ((self.decoder1, self.head0), (self.decoder2, self.head1), (self.decoder3, self.head2))
        for i, (layer, aux_head) in enumerate(layers):
            if rejection is not None:
                with stage(f"reject{i}"):
                    selected = rows.reject(aux_head(x), rejection)
                    x = kernels.gather_rows(x, selected, rows.count)
                    corr_source = kernels.gather_rows(corr_source, selected, rows.count)
            elif with_aux:
                with stage(f"aux{i}"):  # official: the aux heads see a detached input
                    aux.append(aux_head(x.detach()).view(batch, classes, *x.shape[-2:]))
            with stage(f"{layer.name}.corr_guidance"):
                corr_source = self.decoder_corr_guidance_projection[i](corr_source)  # kept rows only
            final_head = self.head if i == 2 else None
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(layer, x, image_guidance[i], corr_source, rows, budget,
                                                      final_head, pooling, use_reentrant=False)
            else:
                x = layer(x, image_guidance[i], corr_source, rows, budget, final_head=final_head, pooling=pooling)
        return x, aux, rows
