"""The evaluation set and its palette from the command-line options of ``eval`` (and of ``train``'s
evaluation set): one reading for both commands; a problem is a usage error."""
from __future__ import annotations

from ..data.vocabulary import parse_vocabulary_arg
from ..toolkit.errors import UsageError
from .datasets import DATASETS, DatasetError, custom_dataset, resolve_dataset
from .palette import PaletteError, builtin_palette, load_palette


def load_palette_option(label_palette, palette_from, class_names):
    """The colour palette of ``--label-palette`` (a file) / ``--palette-from`` (a built-in dataset's),
    checked against ``class_names``; or None. A problem is a usage error."""
    if label_palette is None and palette_from is None:
        return None
    try:
        palette = load_palette(label_palette) if label_palette is not None else \
            builtin_palette(palette_from, list(DATASETS))
        palette.check_classes(class_names)
    except PaletteError as error:
        raise UsageError(str(error)) from error
    return palette


def load_dataset(name=None, *, data_root=None, images=None, labels=None, vocab=None, ignore=None, limit=None,
                 label_palette=None, palette_from=None):
    """The evaluation set of the command-line options: a dataset ``name`` under ``data_root``, or a
    custom one (``images``, ``labels``, ``vocab``, ``ignore``); its first ``limit`` samples, with
    its palette. A problem is a usage error."""

    try:
        if name is not None:
            dataset = resolve_dataset(name, data_root)
        else:
            try:
                names = parse_vocabulary_arg(vocab)
            except Exception as error:  # noqa: BLE001 - a bad --vocab, whatever the reason
                raise UsageError(f"--vocab {vocab!r}: {error}") from error
            dataset = custom_dataset(images, labels, names, ignore)
    except DatasetError as error:
        raise UsageError(str(error)) from error
    if limit is not None:
        dataset.samples = dataset.samples[:limit]
    dataset.palette = load_palette_option(label_palette, palette_from, dataset.class_names)
    return dataset
