"""Dataset evaluation (``sed-fast eval``): detectron2's ``SemSegEvaluator`` metrics on the official
evaluation sets (or any folder of images and label maps), in one process or many (torchrun).

* :mod:`.datasets`: the official layouts, pairing by file stem, detectron2's image/label reading;
* :mod:`.metrics`: the confusion matrix and the metrics (current and legacy mIoU rule);
* :mod:`.runner`: the loop (loader workers, :func:`~.runner.predict`, sync points, resume);
* :mod:`.distributed`: sharding and the all-reduce under ``torch.distributed``;
* :mod:`.state`: the saved, resumable state; :mod:`.report`: the output files;
* :mod:`.cli`: the command line, ``main(argv) -> exit code``.
"""
from .datasets import DATASETS, DatasetError, DatasetSpec, custom_dataset, resolve_dataset
from .metrics import ConfusionMatrix, compute_metrics, copypaste_lines

__all__ = ["DATASETS", "DatasetError", "DatasetSpec", "custom_dataset", "resolve_dataset", "ConfusionMatrix",
           "compute_metrics", "copypaste_lines"]
