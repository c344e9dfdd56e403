#!/usr/bin/env bash
# Run the CUDA-backend tests under NVIDIA compute-sanitizer (on a machine with a GPU).
#
#   tools/compute_sanitizer.sh                 # memcheck, racecheck, initcheck, synccheck
#   tools/compute_sanitizer.sh memcheck        # one tool
#   SANITIZER_TESTS="-k 'topk and cuda'" tools/compute_sanitizer.sh memcheck   # narrower selection
#   SANITIZER_KERNELS=kns=topk_ tools/compute_sanitizer.sh   # check only kernels matching a filter
#
# The caching allocator is switched off (PYTORCH_NO_CUDA_MEMORY_CACHING=1) so that an access past
# the end of a tensor hits unallocated memory and memcheck reports it, and initcheck sees every
# output allocation fresh (a kernel that leaves an output element unwritten, or reads one before
# writing it, is reported). tests/test_cuda_backend.py runs without its triton and torch backend
# cases (the references still run inside the cuda cases; if a PyTorch kernel is reported, pass
# SANITIZER_KERNELS, compute-sanitizer's --kernel-name filter); SED_FAST_SANITIZER=1 makes it use its
# small shape set. The extension is built / loaded first, outside the sanitizer.
# Exit status: non-zero if any tool reports an error.
set -euo pipefail
cd "$(dirname "$0")/.."

SANITIZER="${COMPUTE_SANITIZER:-}"
if [[ -z "$SANITIZER" ]]; then
  for candidate in compute-sanitizer "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
                   /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    if command -v "$candidate" >/dev/null 2>&1; then SANITIZER="$(command -v "$candidate")"; break; fi
  done
fi
if [[ -z "$SANITIZER" ]]; then
  echo "compute-sanitizer not found (set COMPUTE_SANITIZER or CUDA_HOME)" >&2
  exit 2
fi

TOOLS=("$@")
if [[ ${#TOOLS[@]} -eq 0 ]]; then TOOLS=(memcheck racecheck initcheck synccheck); fi
SELECTION="${SANITIZER_TESTS:--k 'not triton and not torch'}"

python -c "from sed_fast.kernels import cuda_extension as ext; import sys; ok = ext.load_extension(); \
print('sed_fast CUDA extension:', ext.how_loaded() if ok else ext.load_error()); sys.exit(0 if ok else 1)"

export PYTORCH_NO_CUDA_MEMORY_CACHING=1 SED_FAST_SANITIZER=1
status=0
for tool in "${TOOLS[@]}"; do
  extra=()
  if [[ -n "${SANITIZER_KERNELS:-}" ]]; then extra+=(--kernel-name "$SANITIZER_KERNELS"); fi
  case "$tool" in
    memcheck) extra+=(--leak-check no --check-device-heap yes) ;;
    racecheck) extra+=(--racecheck-report all) ;;
    initcheck) extra+=(--track-unused-memory no) ;;
  esac
  echo "=== compute-sanitizer --tool $tool ==="
  # --target-processes all: pytest may start helper processes; --error-exitcode makes failures visible.
  if ! eval '"$SANITIZER" --tool "$tool" "${extra[@]}" --target-processes all --error-exitcode 99 \
      python -m pytest tests/test_cuda_backend.py '"$SELECTION"' -q -p no:cacheprovider'; then
    echo "=== $tool: FAILED ===" >&2
    status=1
  fi
done
exit $status
