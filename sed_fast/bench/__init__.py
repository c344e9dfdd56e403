"""Benchmarks of sed_fast: per-kernel (``sed_fast.bench.kernels``), end-to-end (``sed_fast.bench.e2e``),
per-stage profile (``sed_fast.bench.profile``) and the report (``sed_fast.bench.report``).

Results are JSON lines under ``./sed_fast_results/`` (or ``--results-dir`` /
``SED_FAST_RESULTS_DIR``); ``benchmarks/gpu_pass.sh`` is the one-shot GPU run.
"""
