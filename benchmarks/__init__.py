"""Benchmarks of sed_fast: per-kernel (``benchmarks.kernels``), end-to-end (``benchmarks.e2e``),
per-stage profile (``benchmarks.profile``) and the report (``benchmarks.report``).

Results are JSON lines under ``benchmarks/results/`` (or ``--results-dir`` /
``SED_FAST_RESULTS_DIR``); ``benchmarks/gpu_pass.sh`` is the one-shot GPU run.
"""
