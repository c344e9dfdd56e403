"""The fast SED: :class:`SEDFast` (the model) and its layers (:mod:`.layers`)."""
from .layers import (ClassRows, FastClassTransformerLayer, FastConvNextBlock, FastDecoder,  # noqa: F401
                     FastUp)
from .model import SEDFast

__all__ = ["SEDFast", "FastDecoder", "FastUp", "FastConvNextBlock", "FastClassTransformerLayer", "ClassRows"]
