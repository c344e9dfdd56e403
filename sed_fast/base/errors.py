"""The package's own warnings and errors about inputs and outputs (importing this is cheap)."""


class PixelRangeWarning(UserWarning):
    """A float image whose values all lie in [0, 1]: probably a 0..1 image where 0..255 is expected."""


class NonFiniteScoresError(FloatingPointError):
    """The model produced NaN or infinite scores (non-finite weights or inputs)."""
