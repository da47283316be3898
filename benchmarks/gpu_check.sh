#!/usr/bin/env bash
# The one prepared check for a machine with a GPU (no internet needed): build the extension for the
# visible GPU, run the CUDA tests with the SIMT kernels and again with the tensor-core switch on,
# run compute-sanitizer's memcheck over the tensor-core tests, run the tensor-core, block and
# fusion-ablation benchmarks, and write the summary to benchmarks/results/gpu-<device>-<commit>.md.
# Fits one 600 s device call: the step caps add up to 540 s (the network benchmark is left out;
# run benchmarks/bench_network.py on its own).
#
#   bash benchmarks/gpu_check.sh            # logs and CSVs go to $OUT, or benchmarks/out/gpu
#
# CUTLASS headers (for the tensor-core kernels; without them those are not built and their tests skip):
# the nvidia-cutlass package when importable, else LAUDNET_OPS_CUTLASS_DIR, else .cutlass/include
# (ignored by git; stage it on a machine that has the package and carry it to the GPU machine:
#   mkdir -p .cutlass && cp -r "$(python -c 'import cutlass_library, os; print(os.path.dirname(
#       cutlass_library.__file__))')/source/include" .cutlass/          # 27 MB of headers
# ), else the nvidia-cutlass wheel in .whl/ (unpacked, not installed).
set -uo pipefail
cd "$(dirname "$0")/.."

OUTDIR="${OUT:-benchmarks/out/gpu}"
mkdir -p "$OUTDIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
summary="$OUTDIR/summary.txt"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUTDIR/NAME.log, record the outcome
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
  local rc=$?
  local verdict="ok"
  [ $rc -eq 0 ] || verdict="FAILED (rc=$rc)"
  [ $rc -eq 124 ] && verdict="TIMED OUT after ${limit}s"
  note "$(printf '%-10s %-22s %4ss  %s' "$name" "$verdict" $((SECONDS - start)) "$(tail -n 1 "$OUTDIR/$name.log" | cut -c1-90)")"
  return $rc
}

note "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
note "device:  $($PY -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"{p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory >> 30} GiB")' 2>&1)"
note "torch:   $($PY -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
note "nvcc:    $(nvcc --version 2>/dev/null | tail -n 2 | head -n 1)"

if [ -z "${LAUDNET_OPS_CUTLASS_DIR:-}" ] && ! $PY -c 'import cutlass_library' 2>/dev/null \
    && [ -f .cutlass/include/cutlass/cutlass.h ]; then
  export LAUDNET_OPS_CUTLASS_DIR="$PWD/.cutlass/include"
fi
if ls .whl/nvidia_cutlass-*.whl >/dev/null 2>&1 && [ -z "${LAUDNET_OPS_CUTLASS_DIR:-}" ]; then
  rm -rf /tmp/cutlass_site && mkdir -p /tmp/cutlass_site
  (cd /tmp/cutlass_site && unzip -q "$OLDPWD"/.whl/nvidia_cutlass-*.whl)
  export LAUDNET_OPS_CUTLASS_DIR=/tmp/cutlass_site/cutlass_library/source/include
fi

note "cutlass: ${LAUDNET_OPS_CUTLASS_DIR:-$($PY -c 'import cutlass_library; print("nvidia-cutlass package")' 2>/dev/null || echo 'not found: tensor-core kernels not built')}"

ARCH=$($PY -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"{p.major}.{p.minor}")')
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
rm -rf build laudnet_ops/_C*.so
if ! step build 160 env LAUDNET_OPS_CUDA=1 $PY setup.py build_ext --inplace; then
  grep -m 20 -E "error|Error" "$OUTDIR/build.log"
  cat "$summary"
  exit 1
fi

# One device call may run 600 s: the step caps below add up to 540 s (tests/test_tensor_cores.py checks).
# The CUDA tests run twice: SIMT kernels (the default), then with the tensor-core switch on.
FAST_TESTS=(-m cuda -q -p no:cacheprovider -k "not property and not compile")  # inductor/Triton compiles take minutes
step cuda-tests 100 $PY -m pytest tests -x "${FAST_TESTS[@]}"
step tc-tests 70 env LAUDNET_OPS_TENSOR_CORES=1 $PY -m pytest tests/test_tensor_cores.py tests/test_gather_conv2d.py \
  tests/test_masker_conv1x1.py tests/test_channel_gated_conv2d.py --maxfail=20 "${FAST_TESTS[@]}"

if command -v compute-sanitizer >/dev/null 2>&1; then
  step memcheck 50 env LAUDNET_OPS_TENSOR_CORES=1 compute-sanitizer --tool memcheck --error-exitcode 3 \
    $PY -m pytest tests/test_tensor_cores.py -m cuda -x -q -p no:cacheprovider \
    -k "float16 and not bfloat16 and (N2_C16 or N2_C32 or N3_C8) and not all_on and not all_off"
else
  note "memcheck   skipped: compute-sanitizer not found"
fi

step bench-tc 60 $PY benchmarks/bench_tensor_cores.py --batch 128 --min-ms 60 \
  --csv "$OUTDIR/bench_tensor_cores.csv"
step bench 60 $PY benchmarks/bench_block.py --gpu h100 --batch 128 --dtype fp16 --rates 0.5 --quiet \
  --min-run-time 0.05 --csv "$OUTDIR/bench_block.csv"
step ablation 40 $PY benchmarks/ablation_fusion.py --gpu h100 --batch 128 --measure cuda --min-run-time 0.05 \
  --quiet --csv "$OUTDIR/ablation_fusion.csv"

report() {  # the summary and the tables, as markdown
  echo "# GPU check $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo '```'
  cat "$summary"
  echo '```'
  for part in bench-tc:bench_tensor_cores bench:bench_block ablation:ablation_fusion; do
    echo
    echo "## ${part#*:}"
    echo
    echo '```'
    sed -n '1,40p' "$OUTDIR/${part%%:*}.log" 2>/dev/null
    echo '```'
  done
}
DEVICE_TAG=$($PY -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-"))' 2>/dev/null || echo unknown)
mkdir -p benchmarks/results
RESULT="benchmarks/results/gpu-${DEVICE_TAG}-$(git rev-parse --short HEAD 2>/dev/null || echo unknown).md"
report >"$RESULT"
cp "$RESULT" "$OUTDIR/" 2>/dev/null
echo
cat "$RESULT"
echo "written: $RESULT"
