"""sed_fast: fast inference for SED (Xie et al., CVPR 2024), open-vocabulary semantic segmentation.

    >>> import sed_fast
    >>> model = sed_fast.build_sed("b", checkpoint="sed_model_base.pth")   # impl="fast" unless impl="reference"
    >>> model.set_vocabulary("ade150")
    >>> scores = model(images)          # (B, T, H, W) in [0, 1]
    >>> labels = model.predict_labels(images)   # (B, H, W) class indices
"""
from .api import FastFallbackWarning, RandomWeightsWarning, build_sed
from .data.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .base.errors import NonFiniteScoresError, PixelRangeWarning

__version__ = "0.1.0"
__all__ = ["build_sed", "load_checkpoint", "save_checkpoint", "CheckpointError", "RandomWeightsWarning",
           "FastFallbackWarning", "PixelRangeWarning", "NonFiniteScoresError", "load_image", "__version__"]


def load_image(path):
    """An image file as an RGB ``PIL.Image``, read as the official demo and evaluation read it
    (detectron2's ``read_image(path, "RGB")``): EXIF orientation applied (a phone photo taken
    upright comes out upright), then converted to RGB (grey, RGBA, palette and CMYK files alike).

        >>> image = sed_fast.load_image("photo.jpg")
        >>> pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)   # (3, H, W) uint8

    (``np.array``, not ``np.asarray``: the latter is a read-only view that torch warns about.)
    """
    from .inputs.image_files import load_image as _load

    return _load(path)
