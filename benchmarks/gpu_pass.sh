#!/usr/bin/env bash
# The one-shot GPU pass: run from the repository root on the GPU machine, in ONE call of at most
# 10 minutes (it budgets itself to finish in about 9):
#
#   bash benchmarks/gpu_pass.sh            # writes into $OUT (default ./out/gpu_pass)
#
# Steps, each bounded by `timeout` against the remaining budget:
#   1. install the carried wheels from .whl/ into /tmp/site (no index, no deps), PYTHONPATH;
#   2. build the CUDA extension in place (setup.py build_ext --inplace, MAX_JOBS);
#   3. pytest on CUDA: the kernel and parity tests (GPU_PASS_TESTS), with a time budget;
#   4. end-to-end matrix for SED-B at 768x768, batch 1, in priority order: ade150, ade847, then
#      voc20, pc59, pc459; exact, CER k=8 and kept 32; reference, reference+autocast, fast float32
#      and bf16 (rows not started within its time budget are skipped and listed);
#   5. kernel benchmarks (SED-B shapes, T = 150 and 847, float32 with every backend, then bf16),
#      per-stage profiles (fast ade847 kept 32, reference ade150), a first report, compute-sanitizer
#      (memcheck, racecheck) on the CUDA-backend tests, then as time allows: the fast model with
#      CUDA graphs, batch 8, TF32 rows, torch.compile of the reference;
#   6. the report (Markdown + PNG) and a short table printed last.
#
# $OUT receives at most 8 files, no sub-folders: e2e.jsonl kernels.jsonl profile.jsonl
# device_peaks.json report.md latency_vs_classes.png stages.png log.txt (every step's full output).
# It commits nothing. Environment: OUT, GPU_PASS_BUDGET (seconds, default 540), GPU_PASS_TESTS
# (pytest arguments), MAX_JOBS (default 16).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out/gpu_pass}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: > "$LOG"
BUDGET="${GPU_PASS_BUDGET:-540}"
SECONDS=0
STATUS=()

say() { echo "[gpu_pass ${SECONDS}s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - SECONDS )); }
# run NAME MAX_SECONDS RESERVE_SECONDS CMD...: at most MAX_SECONDS, and never into the last
# RESERVE_SECONDS of the budget (skipped if that leaves under MIN_SECONDS, default a third of
# MAX_SECONDS within 10..30 s); output to the log; records the status.
run() {
  local name="$1" max="$2" reserve="$3"; shift 3
  local limit=$(( BUDGET - SECONDS - reserve ))
  if (( limit > max )); then limit=$max; fi
  local least=$(( max / 3 )); (( least < 10 )) && least=10; (( least > 30 )) && least=30
  least="${MIN_SECONDS:-$least}"
  if (( limit < least )); then
    say "SKIP $name (no time left)"; STATUS+=("$name: skipped (budget)"); return 0
  fi
  say "START $name (limit ${limit}s): $*"
  echo "----- $name -----" >> "$LOG"
  timeout -s INT -k 15 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  if (( rc == 124 || rc == 130 || rc == 137 )); then
    STATUS+=("$name: TIMED OUT after ${limit}s (partial results kept)")
  elif (( rc != 0 )); then
    STATUS+=("$name: FAILED rc=$rc (see log.txt)")
  else
    STATUS+=("$name: ok")
  fi
  say "END $name rc=$rc"
  return 0
}

# -- 1. environment ---------------------------------------------------------------------------------
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >> "$LOG" 2>&1 \
    && STATUS+=("wheels: ok") || STATUS+=("wheels: FAILED (see log.txt)")
  export PYTHONPATH="/tmp/site:$PWD"
else
  STATUS+=("wheels: none in .whl/")
  export PYTHONPATH="$PWD"
fi
export MAX_JOBS="${MAX_JOBS:-16}"
export SED_FAST_CACHE_DIR="${SED_FAST_CACHE_DIR:-/tmp/sed_fast_cache}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >> "$LOG" 2>&1
python3 - >> "$LOG" 2>&1 <<'EOF'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
import open_clip, timm, sed_fast
print("open_clip", open_clip.__version__, "timm", timm.__version__, "sed_fast", sed_fast.__version__)
EOF
if (( $? != 0 )); then STATUS+=("imports: FAILED (see log.txt)"); fi

# -- 2. CUDA extension ----------------------------------------------------------------------------------
run "build_ext" 200 320 python3 setup.py build_ext --inplace
# A failed build must not turn into a multi-minute JIT build inside the benchmarks.
export SED_FAST_JIT_BUILD=0
python3 -c "import sed_fast._C" >> "$LOG" 2>&1 && say "sed_fast._C imports" || say "sed_fast._C does NOT import: the cuda backend is unavailable"

# -- 3. tests on CUDA -------------------------------------------------------------------------------------
TESTS="${GPU_PASS_TESTS:-}"
if [[ -z "$TESTS" ]]; then
  TESTS="tests/kernels tests/test_cuda_backend.py tests/test_fast_model.py"
  for extra in tests/test_gpu*.py tests/test_*parity*.py; do [[ -e "$extra" ]] && TESTS="$TESTS $extra"; done
fi
# (the sm_90 compile report test is for machines without a GPU; here the kernels compile for real)
run "pytest" 100 300 python3 -m pytest -q -rfE -p no:cacheprovider --durations=8 \
  --ignore=tests/kernels/test_compile_for_gpu.py $TESTS
grep -E "passed|failed|error" "$LOG" | tail -1 | sed 's/^/[pytest] /'

# -- 4. end to end, main matrix (priority order; rows not started by --time-budget are skipped) -----
COMMON=(--results-dir "$OUT" --variants b --image-size 768 --clip-resolution 768)
B=$(( $(left) - 230 )); (( B > 170 )) && B=170
run "e2e main" $(( B + 50 )) 180 python3 -m sed_fast.bench.e2e "${COMMON[@]}" --batches 1 \
  --vocabs ade150,ade847,voc20,pc59,pc459 --impls reference,reference+autocast,fast --fast-dtypes float32,bfloat16 \
  --cer-topk 8 --kept-classes 32 --time-budget "$B"

# -- 5. kernels, profiles, then the lower priorities -------------------------------------------------------
B=$(( $(left) - 120 - 20 )); (( B > 55 )) && B=55
run "kernels" $(( B + 20 )) 120 python3 -m sed_fast.bench.kernels --results-dir "$OUT" --classes 150,847 \
  --dtypes float32,bfloat16 --backends --time-budget "$B"
run "profile fast" 40 85 python3 -m sed_fast.bench.profile --results-dir "$OUT" --save --impl fast --vocab ade847 \
  --kept-classes 32 --reps 5
run "profile reference" 40 75 python3 -m sed_fast.bench.profile --results-dir "$OUT" --save --impl reference \
  --vocab ade150 --reps 5
# Report now too: whatever happens below, $OUT holds a report.
run "report" 40 0 python3 -m sed_fast.bench.report --results-dir "$OUT"
# compute-sanitizer (memcheck, then racecheck) over the CUDA-backend tests at their small shapes.
run "sanitizer memcheck" 60 140 bash tools/compute_sanitizer.sh memcheck
run "sanitizer racecheck" 40 130 bash tools/compute_sanitizer.sh racecheck
B=$(( $(left) - 120 )); (( B > 35 )) && B=35; (( B < 15 )) && B=-100   # not worth a model build
run "e2e cuda graphs" $(( B + 35 )) 80 python3 -m sed_fast.bench.e2e "${COMMON[@]}" --batches 1 --vocabs ade150,ade847 \
  --impls fast --fast-dtypes float32,bfloat16 --fast-options cuda_graphs=true --cer-topk "" --kept-classes 32 \
  --max-reps 20 --time-budget "$B"
B=$(( $(left) - 100 )); (( B > 40 )) && B=40; (( B < 15 )) && B=-100
run "e2e batch 8" $(( B + 40 )) 60 python3 -m sed_fast.bench.e2e "${COMMON[@]}" --batches 8 --vocabs ade150 \
  --impls reference,fast --fast-dtypes float32,bfloat16 --cer-topk "" --kept-classes 32 --max-reps 10 --time-budget "$B"
B=$(( $(left) - 80 )); (( B > 30 )) && B=30; (( B < 15 )) && B=-100
run "e2e tf32" $(( B + 30 )) 45 python3 -m sed_fast.bench.e2e "${COMMON[@]}" --batches 1 --vocabs ade150,ade847 --tf32 \
  --impls reference,fast --fast-dtypes float32 --cer-topk "" --kept-classes "" --max-reps 10 --time-budget "$B"
MIN_SECONDS=100 run "e2e compile" 240 30 python3 -m sed_fast.bench.e2e "${COMMON[@]}" --batches 1 --vocabs ade150 \
  --impls reference+compile --cer-topk "" --kept-classes "" --max-reps 10 --no-stages --compile-min-seconds 0

# -- 6. report and summary ------------------------------------------------------------------------------
run "report" 40 0 python3 -m sed_fast.bench.report --results-dir "$OUT"
rm -f "$OUT"/*.tmp
say "files in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
echo
echo "== gpu_pass summary (${SECONDS}s; full output in log.txt) =="
for s in "${STATUS[@]}"; do echo "  $s"; done
python3 -m sed_fast.bench.report --results-dir "$OUT" --out /tmp/gpu_pass_report --no-plots --print 2>&1 | tail -n +2
exit 0
