"""The sed_fast ops: Triton kernels with plain PyTorch references, behind ``torch.library`` ops.

Public functional API (each validates its inputs, then calls the ``sed_fast::<name>`` custom op,
which runs the backend chosen by :mod:`.dispatch`):

* :func:`cost_map` -- fused L2-normalised cosine cost map, written in conv1's layout;
* :func:`dwconv_layernorm` -- ConvNeXt depthwise conv + channels-last LayerNorm;
* :func:`class_attention` -- linear attention across (ragged, per-image) classes at each pixel;
* :func:`topk_union_reject` and :func:`gather_rows` -- category early rejection on the device;
* :func:`pil_bilinear_resize` -- Pillow's bilinear resize of uint8 images, bit for bit;
* :func:`upsample_bce_loss` -- the training loss: bilinear upsampling + one-hot BCE-with-logits mean.

Every op on the training path is differentiable (``register_autograd``): cost_map,
dwconv_layernorm and class_attention through their ``sed_fast::<op>_backward`` ops, in the same files (Triton on
CUDA, torch.func.vjp of the reference elsewhere: :mod:`._autograd`), gather_rows by an index_add.

:mod:`.cpu_linear` is not an op: it sends the fast model's float32 ``F.linear`` calls on CPU to
oneDNN's matmul (faster than the BLAS one there), keeping ``F.linear`` wherever that cannot apply.

``<op>_reference`` are the plain PyTorch references (the ``"torch"`` backend). Each op file holds
the whole op: kernels, reference, registration, its backward op, its example inputs
(``example_inputs(device, dtype, size)``) and its cost model (``cost(...) -> Cost(flops, bytes)``,
registered in :mod:`.costs`, which also hands the FLOPs to ``torch.utils.flop_counter``).
"""
from ..base.envvars import env_value
from . import autotune, dispatch
from .dispatch import set_autotune, set_backend
from .costs import Cost, cost_model, cost_of_call, registered_ops
from .class_attention import class_attention, class_attention_reference
from .cost_map import cost_map, cost_map_reference
from .dwconv_layernorm import dwconv_layernorm, dwconv_layernorm_reference
from .topk_union_reject import gather_rows, gather_rows_reference, topk_union_reject, topk_union_reject_reference
from .pil_bilinear_resize import pil_bilinear_resize, pil_bilinear_resize_reference
from .upsample_bce_loss import upsample_bce_loss, upsample_bce_loss_reference
from . import cuda_extension  # noqa: F401  registers the "cuda" backend (it loads the extension on first use)

# dispatch stands on nothing of sed_fast: its environment reader and timing-based chooser are handed
# in here, where the package is imported (Python imports it before any of its modules is used).
dispatch.set_environment_reader(env_value)
dispatch.set_backend_chooser(autotune.choose)

__all__ = [
    "set_backend", "set_autotune", "Cost", "cost_model", "cost_of_call", "registered_ops",
    "cost_map", "cost_map_reference",
    "dwconv_layernorm", "dwconv_layernorm_reference",
    "class_attention", "class_attention_reference",
    "topk_union_reject", "topk_union_reject_reference",
    "gather_rows", "gather_rows_reference",
    "pil_bilinear_resize", "pil_bilinear_resize_reference",
    "upsample_bce_loss", "upsample_bce_loss_reference",
]
