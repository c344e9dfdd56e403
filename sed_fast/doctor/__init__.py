"""``sed-fast doctor``: what works on this machine, checked, before anything else is run on it.

It reports the versions (Python, torch, Triton, CUDA, cuDNN, the driver), the device and its compute
capability, whether the CUDA extension is loaded (and, if not, why), then runs every backend of
every op on small random inputs against the op's plain PyTorch reference (max error, time), prints
what dispatch will choose for each op and why, and checks the whole model end to end (fast against
reference on a drawn sample image, random weights, small resolution).

A backend that disagrees with its reference, or fails on inputs it says it takes, is reported and
excluded from dispatch for the rest of the process (:func:`sed_fast.kernels.dispatch.exclude`), so
that the end-to-end check and anything run after it in the same process never use it.

Exit code: 0 all is well, 1 something failed (a backend disagreed or raised, or the end-to-end
check failed), 2 usage error. See :mod:`sed_fast.doctor.cli` for the options.
"""
