"""sed_fast: fast inference for SED (Xie et al., CVPR 2024), open-vocabulary semantic segmentation.

    >>> import sed_fast
    >>> model = sed_fast.build_sed("b", checkpoint="sed_model_base.pth")
    >>> model.set_vocabulary("ade150")
    >>> scores = model(images)          # (B, T, H, W) in [0, 1]
"""
from .api import RandomWeightsWarning, build_sed
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint

__version__ = "0.1.0"
__all__ = ["build_sed", "load_checkpoint", "save_checkpoint", "CheckpointError", "RandomWeightsWarning",
           "__version__"]
