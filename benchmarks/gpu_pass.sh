#!/usr/bin/env bash
# The GPU pass, in two device calls of at most ~5 minutes each (run from the repository root):
#
#   bash benchmarks/gpu_pass.sh 1            # call 1: build, CUDA tests, the headline end-to-end rows
#   bash benchmarks/gpu_pass.sh 2            # call 2: kernels, torch.compile, batch 8, SED-L, video, training,
#                                            #         a CUDA export, sanitizer
#   bash benchmarks/gpu_pass.sh --dry-run 1  # every step of call 1 at tiny sizes on the CPU (CI runs it)
#
# Every step runs in its own process (an illegal memory access poisons its process's CUDA context,
# not the next step's), bounded by `timeout`, and writes into $OUT as it goes; a step that fails or
# hangs is recorded and the next one runs. The budget (GPU_PASS_BUDGET, default 280 s per call)
# leaves room inside a 300 s device call. $OUT gets at most 8 files, no sub-folders:
#   call 1: log1.txt, e2e.jsonl, env.json, status1.txt, report.md, latency_vs_classes.png, stages.png
#   call 2: log2.txt, kernels.jsonl (the kernels, the resize against PIL, the training step; + e2e.jsonl
#   rows, report),
#   status2.txt
# Call 1, in priority order (ade847 and ade150, SED-B, 768x768, batch 1, exact decoding):
#   `sed-fast doctor` (each op's backends against their references, dispatch, end to end; float32),
#   the CUDA extension build (in the background, timed), the reference rows (fp32 TF32 off, fp32
#   TF32 on: the official setting, bf16 autocast), the op and fast-model tests on CUDA, the fast rows
#   (fp32, bf16) and fast bf16 with CER k=8 and with 32 kept classes. Each row's outputs are checked
#   against the fp32 reference in the same process.
set -u
cd "$(dirname "$0")/.."
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
CALL="${1:-1}"
if [[ "$CALL" != 1 && "$CALL" != 2 ]]; then echo "usage: $0 [--dry-run] 1|2" >&2; exit 2; fi
OUT="${OUT:-$PWD/out/gpu_pass}"
mkdir -p "$OUT"
LOG="$OUT/log$CALL.txt"
STATUS_FILE="$OUT/status$CALL.txt"
: > "$LOG"; : > "$STATUS_FILE"
BUDGET="${GPU_PASS_BUDGET:-280}"
SECONDS=0

say() { echo "[gpu_pass $CALL ${SECONDS}s] $*" | tee -a "$LOG"; }
record() { echo "$*" | tee -a "$STATUS_FILE" >> "$LOG"; }
# run NAME LIMIT CMD...: at most LIMIT seconds (times SCALE) and never past the budget; output to the log.
SCALE=1
run() {
  local name="$1" limit=$(( $2 * SCALE )); shift 2
  local left=$(( BUDGET - SECONDS - 5 ))
  (( limit > left )) && limit=$left
  if (( limit < 10 )); then record "$name: skipped (budget)"; return 0; fi
  say "START $name (limit ${limit}s)"
  echo "----- $name: $* -----" >> "$LOG"
  local start=$SECONDS
  timeout -s INT -k 10 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  if (( rc == 124 || rc == 130 || rc == 137 )); then record "$name: TIMED OUT after ${limit}s (partial results kept)"
  elif (( rc != 0 )); then record "$name: FAILED rc=$rc ($(( SECONDS - start ))s, see $(basename "$LOG"))"
  else record "$name: ok ($(( SECONDS - start ))s)"; fi
  return 0
}

# -- environment ---------------------------------------------------------------------------------------
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >> "$LOG" 2>&1 \
    || record "wheels: FAILED (see log)"
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export SED_FAST_CACHE_DIR="${SED_FAST_CACHE_DIR:-/tmp/sed_fast_cache}" PYTHONUNBUFFERED=1
if (( DRY )); then
  SCALE=4  # a CPU builds models and runs them slower than the GPU machine does
  DEVICE=cpu
  E2E=(--device cpu --smoke --variants b --image-size 64 --clip-resolution 64 --max-reps 2 --no-stages)
  KERNELS=(--device cpu --smoke --reps 2)
  COMPILE=(--compile-mode eager)  # dynamo tracing only: inductor on a CPU takes minutes
  VOCABS=random5,random3
  DOCTOR=(--device cpu --reps 1)
  PYTEST_SELECTION=(tests/test_layering.py)
  TRAIN=(--device cpu --resolution 64 --classes 5 --iters 1 --warmup 0)
else
  DEVICE=cuda
  E2E=(--device cuda --variants b --image-size 768 --clip-resolution 768 --max-reps 20 --target-seconds 0.6 --no-stages)
  KERNELS=(--device cuda --classes 150,847)
  COMPILE=(--compile-mode default)
  VOCABS=ade847,ade150
  DOCTOR=(--device cuda --dtypes float32)  # bf16 too would double the Triton compiles
  PYTEST_SELECTION=(-m gpu tests/kernels tests/test_cuda_backend.py tests/test_fast_model.py
                    --ignore=tests/kernels/test_compile_for_gpu.py)
  TRAIN=(--device cuda --resolution 768 --classes 171 --iters 3 --warmup 1)  # the official training setting
fi
E2E+=(--results-dir "$OUT")
python3 - "$OUT/env.json" "$DEVICE" >> "$LOG" 2>&1 <<'EOF' || record "environment: FAILED (see log)"
import json, subprocess, sys
import torch
from sed_fast.bench import common
row = common.environment(sys.argv[2])
try:
    row["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                        "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except OSError:
    row["nvidia_smi"] = None
json.dump(row, open(sys.argv[1], "w"), indent=2)
print(json.dumps(row))
EOF

report() { run "report" 30 python3 -m sed_fast.bench.report --results-dir "$OUT" --out "$OUT"; }

if [[ "$CALL" == 1 ]]; then
  # First: what works on this GPU (every backend of every op against its reference, dispatch, end to end).
  run "doctor" 45 env SED_FAST_JIT_BUILD=0 python3 -m sed_fast doctor --no-build "${DOCTOR[@]}"
  # The extension builds on the CPUs while the reference rows (which do not use it) run on the GPU.
  BUILD_PID=
  if (( DRY )); then
    record "build_ext: skipped (dry run: the CUDA sources are compiled by the test suite on CPU)"
  else
    say "START build_ext (background)"
    ( start=$SECONDS; SED_FAST_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-12}" timeout -k 10 200 \
        python3 setup.py build_ext --inplace > "$OUT/build.log.tmp" 2>&1; rc=$?
      echo "build_ext: rc=$rc in $(( SECONDS - start ))s" >> "$OUT/build.log.tmp" ) &
    BUILD_PID=$!
  fi
  export SED_FAST_JIT_BUILD=0  # a failed build must not turn into a JIT build inside a timed step
  run "e2e reference fp32" 45 python3 -m sed_fast.bench.e2e "${E2E[@]}" --batches 1 --vocabs "$VOCABS" --impls reference \
    --cer-topk "" --kept-classes ""
  run "e2e reference fp32 tf32" 40 python3 -m sed_fast.bench.e2e "${E2E[@]}" --batches 1 --vocabs "$VOCABS" --impls reference \
    --cer-topk "" --kept-classes "" --tf32
  run "e2e reference bf16 autocast" 40 python3 -m sed_fast.bench.e2e "${E2E[@]}" --batches 1 --vocabs "$VOCABS" \
    --impls reference+autocast --autocast-settings exact --cer-topk "" --kept-classes ""
  if [[ -n "$BUILD_PID" ]]; then
    wait "$BUILD_PID"
    cat "$OUT/build.log.tmp" >> "$LOG"; record "$(tail -1 "$OUT/build.log.tmp")"; rm -f "$OUT/build.log.tmp"
  fi
  run "pytest cuda" 60 python3 -m pytest -q -x -p no:cacheprovider "${PYTEST_SELECTION[@]}"
  run "e2e fast fp32+bf16" 45 python3 -m sed_fast.bench.e2e "${E2E[@]}" --batches 1 --vocabs "$VOCABS" --impls fast \
    --fast-dtypes float32,bfloat16 --cer-topk "" --kept-classes ""
  run "e2e fast bf16 cer8 kept32" 40 python3 -m sed_fast.bench.e2e "${E2E[@]}" --batches 1 --vocabs "$VOCABS" --impls fast \
    --fast-dtypes bfloat16 --no-exact --cer-topk 8 --kept-classes 32
  report
else
  export SED_FAST_JIT_BUILD=0
  run "kernels" 70 python3 -m sed_fast.bench.kernels "${KERNELS[@]}" --results-dir "$OUT" --dtypes float32,bfloat16 \
    --backends --time-budget 55
  run "kernels backward" 35 python3 -m sed_fast.bench.kernels "${KERNELS[@]}" --results-dir "$OUT" --dtypes bfloat16 \
    --ops cost_map_backward,dwconv_layernorm_backward,class_attention_backward --time-budget 25
  run "resize vs PIL" 30 python3 benchmarks/resize_vs_pil.py --device "$DEVICE" --reps "$(( DRY ? 3 : 100 ))" \
    --out "$OUT/kernels.jsonl"
  run "e2e reference torch.compile" 90 python3 -m sed_fast.bench.e2e "${E2E[@]}" --batches 1 --vocabs "${VOCABS##*,}" \
    --impls reference+compile --cer-topk "" --kept-classes "" --compile-min-seconds 0 "${COMPILE[@]}"
  run "e2e batch 8" 40 python3 -m sed_fast.bench.e2e "${E2E[@]}" --batches 8 --vocabs "${VOCABS##*,}" \
    --impls reference,fast --fast-dtypes bfloat16 --cer-topk "" --kept-classes 32
  run "e2e SED-L" 40 python3 -m sed_fast.bench.e2e "${E2E[@]}" --batches 1 --variants l --vocabs "${VOCABS%%,*}" \
    --impls reference,fast --fast-dtypes bfloat16 --cer-topk "" --kept-classes ""
  if python3 -c "import av" > /dev/null 2>&1; then  # decode + model + encode vs model only, rows in kernels.jsonl
    run "video throughput" 40 python3 benchmarks/video_throughput.py --device "$DEVICE" --out "$OUT/kernels.jsonl" \
      $( (( DRY )) && echo "--frames 6 --width 96 --height 64 --batch-size 3 --classes 5 --resolution 64" )
  else
    record "video throughput: skipped (PyAV is not installed: add its wheel to .whl/)"
  fi
  # Training step (SED-B, 768 crop, 171 classes, batch 1): reference vs fast, checkpointing off/on.
  run "train step" 45 python3 -m sed_fast.bench.train_step "${TRAIN[@]}" --out "$OUT/kernels.jsonl"
  # A CUDA AOTInductor package of the reference path (raw image in), loaded in a fresh process.
  run "export pt2 cuda" 100 python3 -m pytest -q -x -p no:cacheprovider -m gpu tests/test_export.py
  if (( DRY )); then
    record "sanitizer memcheck: skipped (dry run: no GPU)"
  else
    SANITIZER_TESTS="-k 'cuda and (topk or dwconv) and not opcheck'" run "sanitizer memcheck" 40 \
      bash tools/compute_sanitizer.sh memcheck
  fi
  report
fi
say "done; files in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
echo "== gpu_pass call $CALL (${SECONDS}s) =="
cat "$STATUS_FILE"
grep -q "FAILED\|TIMED OUT" "$STATUS_FILE" && exit 1
exit 0
