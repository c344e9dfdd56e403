"""sed_fast: fast inference for SED (Xie et al., CVPR 2024), open-vocabulary semantic segmentation.

    >>> import sed_fast
    >>> model = sed_fast.build_sed("b", checkpoint="sed_model_base.pth")
    >>> model.set_vocabulary("ade150")
    >>> scores = model(images)          # (B, T, H, W) in [0, 1]
    >>> labels = model.predict_labels(images)   # (B, H, W) class indices
"""
from .api import RandomWeightsWarning, build_sed
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .errors import NonFiniteScoresError, PixelRangeWarning

__version__ = "0.1.0"
__all__ = ["build_sed", "load_checkpoint", "save_checkpoint", "CheckpointError", "RandomWeightsWarning",
           "PixelRangeWarning", "NonFiniteScoresError", "__version__"]
