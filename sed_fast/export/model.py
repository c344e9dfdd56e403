"""The model an export is made from: the reference (or fast) SED with its vocabulary, built through the API
(kept apart from :mod:`.core`, which exports and checks whatever model it is given)."""
from __future__ import annotations

from typing import Optional

import torch


def build_model(variant: str, vocab, checkpoint: Optional[str], resolution: int, dtype: torch.dtype,
                text_cache: bool = True, device: str = "cpu", impl: str = "reference"):
    """The eager model (``impl``: reference or fast) on ``device`` with its vocabulary, the official
    resize left to the caller."""
    import warnings

    from ..api import RandomWeightsWarning, build_sed  # read at the call, as the commands read it

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = build_sed(variant, impl=impl, checkpoint=checkpoint, device=device, dtype=dtype,
                          clip_resolution=resolution, text_cache=text_cache, preprocess="none")
    if isinstance(vocab, torch.Tensor):  # embeddings given directly (tests)
        model.text_embeddings = vocab.to(dtype)
        model.class_names = [f"class{i}" for i in range(vocab.shape[0])]
    else:
        model.set_vocabulary(vocab, progress=False)
    return model
