"""The fast SED: the reference model with its decoder layers swapped for fast ones.

Same parameters (shared with a reference model when built by :meth:`SEDFast.from_reference`), same
state dict, same outputs up to float rounding; what changes is listed in
:mod:`sed_fast.models.fast.layers`, plus, here:

* the image encoder runs channels-last and, with ``cuda_graphs``, replays a captured CUDA graph;
* the chunk budget of the per-class work is decided once per forward;
* the input's values are checked after the forward (no early host sync);
* training (:meth:`~sed_fast.models.sed.SEDBase.losses`): the same fast layers under autograd,
  and each loss term by the fused ``upsample_bce_loss`` op.

The only host-device synchronisations in a forward are the reads of the kept-class counts after
each rejection step and one read of the input and score checks at the end.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from ... import kernels
from ..config import CLIP_RESOLUTION, EVAL_POOLING, VariantSpec
from ...base.envvars import env_value
from ...kernels.cpu_linear import onednn_linear_mode
from ..sed import SEDBase, SEDReference, _Predictor, _SemSegHead
from .layers import FastDecoder

# On CPU a chunk's tensors should stay in the last-level cache between the ops that pass them on:
# 64 MiB made the decoder's convolutions 2x faster than 512 (ade150, encoder at 768, 2 threads).
_DEFAULT_CPU_CHUNK_BYTES = 64 << 20


def _chunk_bytes_from_env() -> Optional[int]:
    megabytes = env_value("SED_FAST_CHUNK_MB")
    return None if megabytes is None else int(megabytes * (1 << 20))


class SEDFast(SEDBase):
    """Kernel-backed SED. Build it with ``sed_fast.build_sed(variant, impl="fast", ...)``.

    Extra options:
        chunk_bytes: memory budget of one chunk of per-class (or per-pixel) work. Default: a
            quarter of the free GPU memory (at most 2 GiB) on CUDA, 64 MiB on CPU; the
            environment variable ``SED_FAST_CHUNK_MB`` overrides the default.
        validate_inputs: check that input pixels are finite and in 0..255 (read after the
            forward, so without an early host sync).
        cuda_graphs: on CUDA, capture the image encoder (static shapes) in a CUDA graph per input
            shape and replay it: removes the encoder's launch overhead. The decoder's shapes depend
            on the kept classes, so it is not captured.
    """

    #: The fast decoder marks its own profiling stages (see sed_fast.base.stages).
    marks_stages = True

    def __init__(self, spec: VariantSpec, *, cer_topk: Optional[int] = None,
                 clip_resolution: int = CLIP_RESOLUTION, text_cache: bool = True, device=None,
                 chunk_bytes: Optional[int] = None, validate_inputs: bool = True,
                 cuda_graphs: bool = False, sem_seg_head: Optional[nn.Module] = None, preprocess: str = "official"):
        if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int)
                                        or chunk_bytes <= 0):
            raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
        super().__init__(spec, cer_topk=cer_topk, clip_resolution=clip_resolution, text_cache=text_cache,
                         pooling_size=EVAL_POOLING, device=device, sem_seg_head=sem_seg_head,
                         preprocess=preprocess)
        shared = sem_seg_head is not None
        # The reference structure with the decoder swapped; new wrappers, so that a shared
        # reference model keeps its own decoder.
        predictor = self.sem_seg_head.predictor
        decoder = FastDecoder.from_reference(predictor.transformer)
        self.sem_seg_head = _SemSegHead(_Predictor(predictor.clip_model, decoder))
        self.chunk_bytes = chunk_bytes
        self.validate_inputs = validate_inputs
        self.cuda_graphs = cuda_graphs
        self._encoder_graphs = {}  # (shape, dtype, device) -> (graph, static input, static outputs)
        if not shared:
            self.to(memory_format=torch.channels_last)

    @classmethod
    def from_reference(cls, reference: SEDReference, **options) -> "SEDFast":
        """A fast model that shares ``reference``'s weights (no copy), rejection rule and vocabulary."""
        fast = cls(reference.spec, clip_resolution=reference.clip_resolution, text_cache=reference.text_cache,
                   sem_seg_head=reference.sem_seg_head, preprocess=reference.preprocess, **options)
        fast.random_weights = getattr(reference, "random_weights", None)
        fast.rejection = reference.rejection
        fast._tokenizer = reference._tokenizer
        if reference.text_embeddings is not None:
            fast.text_embeddings = reference.text_embeddings
            fast.class_names = list(reference.class_names)
        return fast

    @property
    def value_checks(self) -> str:
        return "late" if self.validate_inputs else "off"

    def decode(self, dense: torch.Tensor, text: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        res2, res3, res4, res5 = features
        return self.decoder(dense, text, (res5, res4, res3, res2), rejection=self.rejection,
                            budget=self._budget(dense.device))

    def training_logits(self, dense: torch.Tensor, text: torch.Tensor, features: Sequence[torch.Tensor]):
        res2, res3, res4, res5 = features
        return self.decoder.logits(dense, text, (res5, res4, res3, res2), pooling=self.train_pooling_size,
                                   budget=self._budget(dense.device))

    @staticmethod
    def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_value: int) -> torch.Tensor:
        """The official loss term by the fused op (``kernels.upsample_bce_loss``): the full-size
        logits and targets are never held."""
        return kernels.upsample_bce_loss(logits, labels, ignore_value)

    def _encode_for_training(self, clip_images: torch.Tensor):
        return self.encode_image(clip_images.contiguous(memory_format=torch.channels_last))

    def _encode(self, images: torch.Tensor):
        """The image encoder on channels-last input: on CPU with its linears through oneDNN
        (:mod:`sed_fast.kernels.cpu_linear`), on CUDA replayed from a CUDA graph when
        ``cuda_graphs`` is on.

        The returned tensors are the graph's static outputs: valid until the next forward."""
        images = images.contiguous(memory_format=torch.channels_last)
        if not images.is_cuda:
            with onednn_linear_mode(images.device):  # the encoder's MLPs through oneDNN on CPU
                return self.encode_image(images)
        if not self.cuda_graphs or torch.cuda.is_current_stream_capturing():
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
