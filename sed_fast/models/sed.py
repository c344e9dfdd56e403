"""The SED model: the test-time pipeline every implementation shares, and the reference.

:class:`SEDBase` takes raw images to scores as the official demo and evaluation do: input checks,
the official resize (``preprocess="official"``), CLIP normalisation and the 768x768 resize, the
encoder, the decoder (``decode``, per implementation), and the scores resized back to each image's
own size (``forward``) or the class map without full-size scores (``predict_labels``).

:class:`SEDReference` decodes with the reference decoder and reproduces the official output
(``sem_seg``). The state dict has exactly the official key names
(``sem_seg_head.predictor.clip_model.*``, ``sem_seg_head.predictor.transformer.*``).

Training (both implementations, see :meth:`SEDBase.losses`): ``model.train()`` then
``model.losses(images, labels)`` gives the official training losses; what trains is the official
``CLIP_FINETUNE: "full"`` (:attr:`SEDBase.clip_finetune`), and
:meth:`SEDBase.trainable_parameter_groups` gives the official optimizer's parameter groups.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..inputs.images import Images, ImageList, as_image_list, check_pixel_values, pixel_extremes
from ..base.errors import NonFiniteScoresError
from ..inputs.preprocess import official_resize
from ..base.stages import stage
from .config import (TRAIN_BASE_LR, TRAIN_CLIP_MULTIPLIER, TRAIN_IGNORE_VALUE, TRAIN_POOLING,
                      TRAIN_SIZE_DIVISIBILITY, TRAIN_WEIGHT_DECAY, TRAIN_WEIGHT_DECAY_NORM)
from .decoder import EVAL_POOLING, ConvNextBlock, RejectionRule, SEDDecoder
from .rejection import TopKUnion, rule_for_topk
from .encoder import (CLIP_PIXEL_MEAN, CLIP_PIXEL_STD, CLIP_RESOLUTION, VariantSpec, create_clip_model,
                      create_tokenizer, dense_image_features, preprocess_images, set_train_regularisation)

PREPROCESS = ("official", "none")
#: What trains (the official ``MODEL.SEM_SEG_HEAD.CLIP_FINETUNE`` values implemented): "full" (the
#: released models: CLIP image tower + decoder), "none" (the decoder alone, CLIP frozen).
CLIP_FINETUNE = ("full", "none")
#: The norm layers of detectron2's ``get_default_optimizer_params`` (as the official
#: ``build_optimizer``): their parameters take ``weight_decay_norm``.
NORM_MODULE_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
                     nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm)
#: The loss keys of :meth:`SEDBase.losses`, in the official order: the final head, then the aux
#: heads after conv1, decoder1 and decoder2.
LOSS_KEYS = ("loss_sem_seg_0", "loss_sem_seg_1", "loss_sem_seg_2", "loss_sem_seg_3")
#: Bytes of upsampled class scores that ``predict_labels`` holds at a time (a chunk of classes).
LABEL_CHUNK_BYTES = 256 << 20
#: From this many output pixels on, ``predict_labels`` upsamples one class at a time, so that its
#: peak is ~9 bytes per pixel (one float32 plane, the best score, the compact labels).
LARGE_LABEL_PIXELS = 8 << 20
_LABEL_BAND_ELEMENTS = 1 << 20  # pixels compared at a time (band-sized temporaries only)


def label_dtype_for(num_classes: int) -> torch.dtype:
    """The smallest integer dtype that holds the class indices 0..num_classes-1."""
    return torch.uint8 if num_classes <= 256 else torch.int16 if num_classes <= 32768 else torch.int32


class _Predictor(nn.Module):
    def __init__(self, clip_model: nn.Module, transformer: nn.Module):
        super().__init__()
        self.clip_model = clip_model
        self.transformer = transformer


class _SemSegHead(nn.Module):
    def __init__(self, predictor: _Predictor):
        super().__init__()
        self.predictor = predictor


class SEDBase(nn.Module):
    """What the reference and the fast model share: weights layout, vocabulary, input checks."""

    def __init__(self, spec: VariantSpec, *, cer_topk: Optional[int] = None,
                 clip_resolution: int = CLIP_RESOLUTION, text_cache: bool = True,
                 pooling_size: Sequence[int] = EVAL_POOLING, device=None,
                 sem_seg_head: Optional[nn.Module] = None, preprocess: str = "official"):
        super().__init__()
        self.spec = spec
        self.clip_resolution = _check_resolution(clip_resolution)
        if preprocess not in PREPROCESS:
            raise ValueError(f"preprocess must be one of {', '.join(map(repr, PREPROCESS))}, got {preprocess!r}")
        self.preprocess = preprocess
        self.text_cache = text_cache
        if sem_seg_head is None:  # else: share another model's weights, no copy
            clip_model = create_clip_model(spec, device=device or "cpu")
            set_train_regularisation(clip_model, spec)
            decoder = SEDDecoder(spec.guidance_dims, pooling_size=pooling_size).to(device or "cpu")
            sem_seg_head = _SemSegHead(_Predictor(clip_model, decoder))
        self.sem_seg_head = sem_seg_head
        self.cer_topk = cer_topk  # sets self.rejection (validated there)
        self._tokenizer = None
        self.class_names: List[str] = []
        self.register_buffer("text_embeddings", None, persistent=False)
        self._clip_finetune = "full"
        # Loading weights may replace parameters (``assign=True``): freeze what must stay frozen again.
        self.register_load_state_dict_post_hook(lambda module, incompatible: module.apply_clip_finetune())
        self.eval()

    # -- parts ----------------------------------------------------------------------------------
    @property
    def clip_model(self) -> nn.Module:
        return self.sem_seg_head.predictor.clip_model

    @property
    def decoder(self) -> SEDDecoder:
        return self.sem_seg_head.predictor.transformer

    @property
    def variant(self) -> str:
        return self.spec.name

    @property
    def cer_topk(self) -> Optional[int]:
        """None: exact decoding; k: category early rejection keeping the per-pixel top-k classes."""
        return self.rejection.k if isinstance(self.rejection, TopKUnion) else None

    @cer_topk.setter
    def cer_topk(self, value: Optional[int]) -> None:
        #: The rejection rule (see :mod:`sed_fast.models.rejection`): None decodes every class.
        self.rejection: Optional[RejectionRule] = rule_for_topk(value)

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.decoder.parameters()).dtype

    # -- vocabulary -----------------------------------------------------------------------------
    def set_vocabulary(self, vocabulary, *, cache: Optional[bool] = None, progress: Optional[bool] = None) -> List[str]:
        """Set the classes to segment; computes (or loads from the cache) their text embeddings.

        ``vocabulary``: a list of class names, a built-in vocabulary name (``"ade150"``,
        ``"ade847"``, ``"pc59"``, ``"pc459"``, ``"voc20"``, ``"voc20b"``, ``"coco"``), or a path to a
        JSON list / text file with one name per line. A name with ``", "`` is a synonym list.
        Returns the class names (output channel t of ``forward`` is ``class_names[t]``).
        """
        from ..data.text import encode_vocabulary
        from ..data.vocabulary import load_vocabulary

        names = load_vocabulary(vocabulary)
        if self._tokenizer is None:
            self._tokenizer = create_tokenizer(self.spec)
        embeddings = encode_vocabulary(self.clip_model, self._tokenizer, names,
                                       cache=self.text_cache if cache is None else cache, progress=progress)
        self.text_embeddings = embeddings.to(self.device)
        self.class_names = list(names)
        return self.class_names

    def _require_vocabulary(self) -> None:
        if self.text_embeddings is None:
            raise RuntimeError("no vocabulary set: call model.set_vocabulary(names) before segmenting")

    def _text_for_decoder(self) -> torch.Tensor:
        self._require_vocabulary()
        return self.text_embeddings.to(self.dtype)

    # -- image side ------------------------------------------------------------------------------
    def clip_input(self, batch: ImageList) -> torch.Tensor:
        """The encoder input (B, 3, S, S), float32: each image resized as the official test-time
        pipeline does (``preprocess="official"``), CLIP-normalised, bilinearly resized to S x S."""
        inputs = []
        for image in batch.images:
            image = image.to(self.device)
            if self.preprocess == "official":
                image = official_resize(image)
            inputs.append(preprocess_images(image[None].float(), self.clip_resolution))
        return torch.cat(inputs)

    def encode_image(self, clip_images: torch.Tensor):
        """(B, 3, S, S) CLIP-normalised images -> (clip_vis_dense, [res2, res3, res4, res5])."""
        return dense_image_features(self.clip_model, clip_images.to(self.dtype))

    _encode = encode_image  # the encoder as the forward runs it (the fast model replays a CUDA graph)

    def segment(self, clip_images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) encoder input -> scores (B, T, S/4, S/4) float32 at the decoder's
        resolution: sigmoid of the logits, exact zeros for rejected classes."""
        text = self._text_for_decoder()
        with stage("image_encoder"):
            dense, features = self._encode(clip_images)
        return self.decode(dense, text, features).float()

    def decode(self, dense: torch.Tensor, text: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """dense (B, D, h, w), text (T, P, D), features [res2, res3, res4, res5] -> scores
        (B, T, 8h, 8w): sigmoid of the logits, exact zeros for rejected classes."""
        raise NotImplementedError

    # -- forward -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _run(self, batch: ImageList) -> torch.Tensor:
        """Check the input's values, run the model: scores (B, T, h, w) at the decoder's resolution."""
        self._require_vocabulary()  # fail before any work (the text itself is read once, by segment)
        when = self.value_checks
        extremes = pixel_extremes(batch) if when != "off" else None
        if when == "early":
            check_pixel_values(extremes)
        with stage("preprocess"):
            clip_images = self.clip_input(batch)
        scores = self.segment(clip_images)
        if when == "late":  # read once the device is done anyway: no early sync
            check_pixel_values(extremes)
        if not bool(torch.isfinite(scores).all()):
            bad = int((~torch.isfinite(scores)).sum())
            raise NonFiniteScoresError(f"the model produced {bad} NaN or infinite scores of {scores.numel()}: its "
                                       "weights are not finite (check the checkpoint) or it overflowed (try float32)")
        return scores

    @torch.no_grad()
    def forward(self, images: Images):
        """Scores at each input image's own size, in [0, 1], float32, as the official ``sem_seg``.

        ``images``: (B, 3, H, W) or (3, H, W) -> (B, T, H, W); a list of (3, H_i, W_i) tensors ->
        a list of (T, H_i, W_i). RGB in 0..255, uint8 or float. With ``cer_topk`` set, rejected
        classes score exact zeros. For the class map alone use :meth:`predict_labels`, which never
        holds (T, H, W) at full size.
        """
        batch = as_image_list(images)
        self._check_scores_fit(batch)
        scores = self._run(batch)
        with stage("resize"):
            if batch.as_batch:
                return self._resize_scores(scores, batch.sizes[0])
            return [self._resize_scores(scores[i:i + 1], size)[0] for i, size in enumerate(batch.sizes)]

    @torch.no_grad()
    def predict_labels(self, images: Images, return_scores: bool = False,
                       label_dtype: Optional[torch.dtype] = torch.int64):
        """The class index of every pixel at each image's own size: ``scores.argmax`` over the
        classes (the first class on ties), without holding the (T, H, W) scores at full size.

        ``images`` as for :meth:`forward`. Returns a list of (H_i, W_i) label maps (for a batch
        tensor, one (B, H, W) tensor) of ``label_dtype``: int64 by default, None for the smallest
        integer dtype that holds the class count (:func:`label_dtype_for`: uint8 up to 256
        classes), which is what is computed; with ``return_scores``, also the winning scores
        (float32, same shapes). Peak memory beyond the decoder: at most :data:`LABEL_CHUNK_BYTES`
        of upsampled scores, and ~9 bytes per output pixel for images of
        :data:`LARGE_LABEL_PIXELS` or more (plus 8 for int64 labels).
        """
        scores, sizes = self.decoder_scores(images)
        return self.labels_at_sizes(scores, sizes, return_scores, label_dtype,
                                    as_batch=isinstance(images, torch.Tensor))

    @torch.no_grad()
    def decoder_scores(self, images: Images):
        """(scores (B, T, h, w) at the decoder's resolution, [(H_i, W_i)] the images' sizes): the
        first half of :meth:`predict_labels`. A caller can let go of large images before the
        second half, :meth:`labels_at_sizes`, which needs only these."""
        batch = as_image_list(images)
        return self._run(batch), batch.sizes

    @torch.no_grad()
    def labels_at_sizes(self, scores: torch.Tensor, sizes, return_scores: bool = False,
                        label_dtype: Optional[torch.dtype] = torch.int64, as_batch: bool = False):
        """The second half of :meth:`predict_labels`: label maps at ``sizes`` from
        :meth:`decoder_scores`' scores (``as_batch``: stacked into one tensor)."""
        labels, best = [], []
        with stage("resize"):
            for i, size in enumerate(sizes):
                image_labels, image_best = labels_from_scores(scores[i], size, label_dtype=label_dtype)
                labels.append(image_labels)
                best.append(image_best if return_scores else None)
                del image_best
        if as_batch:
            labels = torch.stack(labels)
            best = torch.stack(best) if return_scores else best
        return (labels, best) if return_scores else labels

    def _check_scores_fit(self, batch: ImageList) -> None:
        """Fail before any work when the full-size scores cannot fit in memory."""
        classes = len(self.class_names)
        needed = 4 * classes * sum(h * w for h, w in batch.sizes)
        available = _available_bytes(self.device)
        if available is not None and needed > available:
            raise MemoryError(
                f"scores for {len(batch)} image(s) x {classes} classes at full size would take "
                f"{needed / 2**30:.1f} GiB (float32), more than the {available / 2**30:.1f} GiB available on "
                f"{self.device}: use model.predict_labels(images) for the class map alone, or fewer classes")

    @staticmethod
    def _resize_scores(scores: torch.Tensor, size) -> torch.Tensor:
        """Scores at the decoder's resolution -> the input image size (bilinear, as officially)."""
        return F.interpolate(scores, size=tuple(size), mode="bilinear", align_corners=False)

    #: When the input's pixel values are checked (NaN/inf, outside 0..255): "early" (before any
    #: work), "late" (after the forward, without an early host sync) or "off".
    value_checks = "early"


    # -- training ----------------------------------------------------------------------------------
    #: Pooling window of the class attention while computing :meth:`losses` (the official training
    #: config's ``POOLING_SIZES``; inference keeps the model's own, (1, 1)).
    train_pooling_size = TRAIN_POOLING
    #: Images are padded (bottom, right) to a multiple of this before the resize to the encoder
    #: resolution, as the official model's ``ImageList.from_tensors`` (``MASK_FORMER.SIZE_DIVISIBILITY``).
    train_size_divisibility = TRAIN_SIZE_DIVISIBILITY

    @property
    def clip_finetune(self) -> str:
        """What trains, as the official ``CLIP_FINETUNE``: ``"full"`` (default, the released models'
        recipe): the CLIP image tower and the whole decoder; ``"none"``: the decoder alone. Either
        way the text tower and ``logit_scale`` are frozen. Applied (``requires_grad``) when set,
        on ``train()``/``eval()`` and after ``load_state_dict``."""
        return self._clip_finetune

    @clip_finetune.setter
    def clip_finetune(self, value: str) -> None:
        if value not in CLIP_FINETUNE:
            raise ValueError(f"clip_finetune must be one of {', '.join(map(repr, CLIP_FINETUNE))}, got {value!r}")
        self._clip_finetune = value
        self.apply_clip_finetune()

    def apply_clip_finetune(self) -> None:
        """Set ``requires_grad`` as :attr:`clip_finetune` says (the official ``SED.__init__`` loop:
        a CLIP parameter trains iff its name has "visual" and the mode is "full"; the decoder's all
        train)."""
        visual = self._clip_finetune == "full"
        for name, parameter in self.clip_model.named_parameters():
            parameter.requires_grad_(visual and "visual" in name)
        for parameter in self.decoder.parameters():
            parameter.requires_grad_(True)

    def train(self, mode: bool = True):
        super().train(mode)
        if hasattr(self, "_clip_finetune"):  # nn.Module.__init__ paths call train() before set-up
            self.apply_clip_finetune()
        return self

    def trainable_parameters(self) -> Dict[str, nn.Parameter]:
        """The parameters that train (``requires_grad``), by state-dict name."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def trainable_parameter_groups(self, base_lr: float = TRAIN_BASE_LR, weight_decay: float = TRAIN_WEIGHT_DECAY,
                                   weight_decay_norm: float = TRAIN_WEIGHT_DECAY_NORM,
                                   clip_multiplier: float = TRAIN_CLIP_MULTIPLIER) -> List[dict]:
        """Optimizer parameter groups as the official ``build_optimizer`` makes them (detectron2's
        ``get_default_optimizer_params`` semantics), merged into at most four groups.

        Each trainable parameter, once: learning rate ``base_lr``, times ``clip_multiplier`` for a
        parameter of a module under ``clip_model``; weight decay ``weight_decay``, or
        ``weight_decay_norm`` for the parameters of norm layers (:data:`NORM_MODULE_TYPES`, as
        isinstance: timm's LayerNorm / LayerNorm2d and the decoder's GroupNorm and class-attention
        LayerNorms count; ConvNeXt's layer-scale ``gamma`` does not, nor does the norm of the
        decoder's ConvNeXt blocks, a plain ``nn.Module`` LayerNorm in the official code, which
        therefore takes ``weight_decay``: :func:`is_official_norm`). Returns a list of dicts with the keys
        ``name`` (``"clip"``, ``"clip_norm"``, ``"decoder"``, ``"decoder_norm"``; empty groups
        left out), ``params``, ``param_names`` (state-dict names), ``lr``, ``weight_decay``: ready
        for ``torch.optim.AdamW(groups, lr=base_lr)``. The official defaults: AdamW, base_lr 2e-4,
        weight decay 1e-4, norm 0, CLIP x0.01, full-model gradient clipping at L2 norm 0.01
        (:data:`sed_fast.models.config.TRAIN_GRAD_CLIP_NORM`).
        """
        return trainable_parameter_groups(self, self.decoder, base_lr=base_lr, weight_decay=weight_decay,
                                          weight_decay_norm=weight_decay_norm, clip_multiplier=clip_multiplier)

    def training_input(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB 0..255 crops -> the encoder input (B, 3, S, S) float32, as the official
        training forward: CLIP normalisation, zero padding (bottom, right) to a multiple of
        :attr:`train_size_divisibility` (``ImageList.from_tensors``), bilinear resize to S x S.
        (float64 for a float64 model.)"""
        dtype = torch.float64 if self.dtype == torch.float64 else torch.float32  # float64: gradient checks
        x = images.to(device=self.device, dtype=dtype)
        mean = torch.tensor(CLIP_PIXEL_MEAN, device=x.device, dtype=dtype).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_PIXEL_STD, device=x.device, dtype=dtype).view(1, 3, 1, 1)
        x = (x - mean) / std
        stride = self.train_size_divisibility
        height, width = x.shape[-2:]
        pad_h, pad_w = (-height) % stride, (-width) % stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), value=0.0)
        size = (self.clip_resolution, self.clip_resolution)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def losses(self, images: torch.Tensor, labels: torch.Tensor, *,
               ignore_value: int = TRAIN_IGNORE_VALUE) -> Dict[str, torch.Tensor]:
        """The official training losses (``SED.forward`` in training mode) of one batch.

        Args:
            images: (B, 3, H, W) RGB crops, uint8 or float in 0..255, as the official dataset
                mapper hands them to the model.
            labels: (B, H, W) integer class indices into the current vocabulary
                (``class_names``), ``ignore_value`` where unlabelled.
            ignore_value: the unlabelled index (official: 255); must not be a class index.

        Returns:
            ``{"loss_sem_seg_0": final head, "_1".."_3": aux heads after conv1, decoder1,
            decoder2}`` (:data:`LOSS_KEYS`), float32 scalars whose sum is the training loss. Each:
            the logits resized bilinearly to the labels' size, BCE-with-logits against one-hot
            targets (all zero at ignored pixels), the mean over every element.

        What it runs, as the official code: :meth:`training_input`; the image encoder with its
        graph (the CLIP image tower trains through ``clip_vis_dense``); res2..res5 detached
        (``clone().detach()``: the guidance trains only the decoder's projections); the vocabulary's
        text embeddings without a graph; the decoder over every class (no rejection whatever
        ``cer_topk``) with the class attention pooled by :attr:`train_pooling_size`; the aux heads
        on detached inputs. Call ``model.train()`` first for the official regularisation (the CLIP
        tower's stochastic depth / dropout, see :class:`~sed_fast.models.config.VariantSpec`); in eval
        mode the same losses without them.
        """
        self._require_vocabulary()
        labels = _check_training_batch(images, labels, len(self.class_names), ignore_value)
        clip_images = self.training_input(images)
        dense, features = self._encode_for_training(clip_images.to(self.dtype))
        features = [f.clone().detach() for f in features]
        text = self.text_embeddings.detach().to(self.dtype)
        outputs = self.training_logits(dense, text, features)
        labels = labels.to(self.device)
        return {key: self.segmentation_loss(logits, labels, ignore_value) for key, logits in zip(LOSS_KEYS, outputs)}

    def _encode_for_training(self, clip_images: torch.Tensor):
        return self.encode_image(clip_images)

    def training_logits(self, dense: torch.Tensor, text: torch.Tensor,
                        features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """The decoder's training outputs: [final (B, T, 8h, 8w), aux after conv1 (B, T, h, w),
        after decoder1 (2h), after decoder2 (4h)], logits, every class, pooled by
        :attr:`train_pooling_size`."""
        raise NotImplementedError

    @staticmethod
    def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_value: int) -> torch.Tensor:
        """One official loss term: (B, T, h, w) logits, (B, H, W) labels -> the BCE-with-logits
        mean (float32) of the logits resized bilinearly to (H, W) against one-hot targets that are
        zero at ignored pixels."""
        return official_segmentation_loss(logits, labels, ignore_value)


def trainable_parameter_groups(model: nn.Module, decoder: nn.Module, base_lr: float = TRAIN_BASE_LR,
                               weight_decay: float = TRAIN_WEIGHT_DECAY,
                               weight_decay_norm: float = TRAIN_WEIGHT_DECAY_NORM,
                               clip_multiplier: float = TRAIN_CLIP_MULTIPLIER) -> List[dict]:
    """:meth:`SEDBase.trainable_parameter_groups` of ``model`` whose decoder is ``decoder``: the
    one place of the official optimizer's rules, for SED and for stand-ins with its module names."""
    groups: Dict[str, dict] = {}
    seen = set()
    norms = {id(module) for module in model.modules() if is_official_norm(module, decoder)}
    for module_name, module in model.named_modules():
        for param_name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            clip = "clip_model" in module_name
            norm = id(module) in norms
            key = ("clip" if clip else "decoder") + ("_norm" if norm else "")
            group = groups.setdefault(key, {
                "name": key, "params": [], "param_names": [],
                "lr": base_lr * (clip_multiplier if clip else 1.0),
                "weight_decay": weight_decay_norm if norm else weight_decay})
            group["params"].append(parameter)
            group["param_names"].append(f"{module_name}.{param_name}" if module_name else param_name)
    return [groups[key] for key in ("clip", "clip_norm", "decoder", "decoder_norm") if key in groups]


def is_official_norm(module: nn.Module, decoder: nn.Module) -> bool:
    """Whether the official optimizer sees ``module`` as a norm layer (weight decay
    ``WEIGHT_DECAY_NORM``): an instance of :data:`NORM_MODULE_TYPES`, except the LayerNorm of
    the decoder's ConvNeXt blocks (the official ``convnext.LayerNorm`` is a plain nn.Module)."""
    if not isinstance(module, NORM_MODULE_TYPES):
        return False
    return not any(module is block.norm for block in decoder.modules() if isinstance(block, ConvNextBlock))


def official_segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_value: int) -> torch.Tensor:
    """The official formula, materialising the full-size logits and targets (the reference)."""
    classes = logits.shape[1]
    out = F.interpolate(_loss_dtype(logits), size=tuple(labels.shape[-2:]), mode="bilinear", align_corners=False)
    out = out.permute(0, 2, 3, 1)
    mask = labels != ignore_value
    targets = torch.zeros(out.shape, device=out.device, dtype=out.dtype)
    targets[mask] = F.one_hot(labels[mask], num_classes=classes).to(out.dtype)
    return F.binary_cross_entropy_with_logits(out, targets)


def _loss_dtype(logits: torch.Tensor) -> torch.Tensor:
    """Losses are computed in float32 (float64 logits stay float64)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _check_training_batch(images, labels, classes: int, ignore_value) -> torch.Tensor:
    """Refuse what the losses cannot mean; returns the labels as int64."""
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"images and labels must be tensors, got {type(images).__name__} and {type(labels).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) RGB, got shape {tuple(images.shape)}")
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"images must not be empty, got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"images must be uint8 or float in 0..255, got {images.dtype}")
    if labels.dim() != 3 or tuple(labels.shape) != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"labels must be (B, H, W) = {(images.shape[0], *images.shape[2:])} like the images, "
                         f"got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices (int64), got {labels.dtype}")
    if isinstance(ignore_value, bool) or not isinstance(ignore_value, int):
        raise TypeError(f"ignore_value must be an int, got {ignore_value!r}")
    if 0 <= ignore_value < classes:
        raise ValueError(f"ignore_value={ignore_value} is a class index of the {classes}-class vocabulary: "
                         f"pass an ignore_value outside 0..{classes - 1}")
    if images.is_floating_point():
        finite = torch.isfinite(images)
        if not bool(finite.all()):
            raise ValueError(f"images have {int((~finite).sum())} NaN or infinite values")
        low, high = float(images.min()), float(images.max())
        if low < 0 or high > 255:
            raise ValueError(f"image values must be in 0..255 (RGB), got {low:g}..{high:g}")
    labels = labels.long()
    bad = (labels != ignore_value) & ((labels < 0) | (labels >= classes))
    if bool(bad.any()):
        values = torch.unique(labels[bad])[:8].tolist()
        raise ValueError(f"labels have {int(bad.sum())} values outside the {classes}-class vocabulary and not "
                         f"ignore_value={ignore_value}, e.g. {values}")
    return labels


class SEDReference(SEDBase):
    """The reference SED: official outputs, official cost (for the fast one see ``impl="fast"``)."""

    def decode(self, dense: torch.Tensor, text: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        res2, res3, res4, res5 = features
        out = self.decoder(dense, text, (res5, res4, res3, res2), rejection=self.rejection)
        return out[0].sigmoid() if isinstance(out, tuple) else out  # exact: (logits, aux logits)

    def training_logits(self, dense: torch.Tensor, text: torch.Tensor,
                        features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        res2, res3, res4, res5 = features
        logits, aux = self.decoder(dense, text, (res5, res4, res3, res2), pooling=self.train_pooling_size)
        return [logits, *aux]


def labels_from_scores(scores: torch.Tensor, size, chunk_bytes: int = LABEL_CHUNK_BYTES,
                       label_dtype: Optional[torch.dtype] = torch.int64):
    """(T, h, w) scores -> (labels (H, W), winning score (H, W) float32) at ``size``, equal to
    ``F.interpolate(scores)`` then argmax (first index on ties).

    Each class plane is ``F.interpolate``'s own output, a chunk of classes at a time (on CPU,
    ``F.interpolate`` of a chunk can differ by one ulp from the same classes interpolated all
    together: its vectorised paths depend on the channel count) (at most ``chunk_bytes``; one class from
    :data:`LARGE_LABEL_PIXELS` output pixels on); the running maximum is kept in place band by
    band, so no other full-size temporary exists. The labels are computed in the smallest dtype
    that holds the class count and returned as ``label_dtype`` (None: that smallest dtype)."""
    height, width = size
    classes = scores.shape[0]
    compact = label_dtype_for(classes)
    step = 1 if height * width >= LARGE_LABEL_PIXELS else max(1, chunk_bytes // max(1, 4 * height * width))
    rows = max(1, _LABEL_BAND_ELEMENTS // max(1, width))
    best = labels = None
    for first in range(0, classes, step):
        upsampled = F.interpolate(scores[None, first:first + step], size=(height, width), mode="bilinear",
                                  align_corners=False)[0]
        if best is None and upsampled.shape[0] == 1:  # the first plane is the running maximum itself
            best = upsampled[0]
            labels = torch.zeros((height, width), dtype=compact, device=scores.device)
            del upsampled
            continue
        fresh = best is None
        if fresh:
            best = torch.empty((height, width), dtype=upsampled.dtype, device=scores.device)
            labels = torch.empty((height, width), dtype=compact, device=scores.device)
        band = None
        for top in range(0, height, rows):
            band = upsampled[:, top:top + rows]
            best_band, label_band = best[top:top + rows], labels[top:top + rows]
            if band.shape[0] == 1:
                better = band[0] > best_band  # strictly: on ties the earlier class keeps the pixel
                label_band.masked_fill_(better, first)
                torch.maximum(best_band, band[0], out=best_band)
                continue
            index = band.argmax(0)
            value = band.gather(0, index[None])[0]
            if fresh:
                best_band.copy_(value)
                label_band.copy_(index)
            else:
                better = value > best_band
                label_band.copy_(torch.where(better, (index + first).to(compact), label_band))
                best_band.copy_(torch.where(better, value, best_band))
        # The last band is a view of this plane: dropped with it, or two planes would be alive
        # while the next one is interpolated (13 bytes per pixel instead of 9).
        del upsampled, band
    if label_dtype is not None and label_dtype != compact:
        labels = labels.to(label_dtype)
    return labels, best


def _available_bytes(device: torch.device):
    """Free memory on ``device`` in bytes (CUDA: the allocator's view; CPU: MemAvailable), or None."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
    return None


def _check_resolution(resolution: int) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 32 or resolution % 32:
        raise ValueError(f"clip_resolution must be a positive multiple of 32 (official: 768), got {resolution!r}")
    return resolution
