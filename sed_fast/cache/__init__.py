"""``sed-fast cache``: list, size and clear the caches sed_fast keeps under its cache root
(``SED_FAST_CACHE_DIR``, default ``~/.cache/sed_fast``).

:mod:`.inventory` finds each cache's entries by the names their writers give them (text embeddings
:mod:`sed_fast.data.text`, autotune choices :mod:`sed_fast.kernels.autotune`, the just-in-time CUDA
build :mod:`sed_fast.kernels.cuda_extension`) and deletes only those; :mod:`.cli` is the command line.
"""
