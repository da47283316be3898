#!/usr/bin/env bash
# The one prepared check for a machine with a GPU (no internet needed): build the extension for the
# visible GPU, run every CUDA test, run compute-sanitizer's memcheck over the sparse kernels' tests,
# run the block, network and fusion-ablation benchmarks, and print a one-screen summary. Designed to finish in under 8 minutes.
#
#   bash benchmarks/gpu_check.sh            # logs and CSVs go to $OUT, or benchmarks/out/gpu
#
# CUTLASS headers: put the nvidia-cutlass wheel in .whl/ (it is unpacked, not installed), or set
# LAUDNET_OPS_CUTLASS_DIR. Missing CUTLASS only matters for the tensor-core kernels.
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

if ls .whl/nvidia_cutlass-*.whl >/dev/null 2>&1 && [ -z "${LAUDNET_OPS_CUTLASS_DIR:-}" ]; then
  rm -rf /tmp/cutlass_site && mkdir -p /tmp/cutlass_site
  (cd /tmp/cutlass_site && unzip -q "$OLDPWD"/.whl/nvidia_cutlass-*.whl)
  export LAUDNET_OPS_CUTLASS_DIR=/tmp/cutlass_site/cutlass_library/source/include
fi

ARCH=$($PY -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"{p.major}.{p.minor}")')
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
rm -rf build laudnet_ops/_C*.so
if ! step build 300 env LAUDNET_OPS_CUDA=1 $PY setup.py build_ext --inplace; then
  grep -m 20 -E "error|Error" "$OUTDIR/build.log"
  cat "$summary"
  exit 1
fi

step cuda-tests 240 $PY -m pytest tests -m cuda -q -p no:cacheprovider

if command -v compute-sanitizer >/dev/null 2>&1; then
  step memcheck 240 compute-sanitizer --tool memcheck --error-exitcode 3 \
    $PY -m pytest tests/test_patch_indices.py tests/test_scatter_add.py -m cuda -q -p no:cacheprovider \
    -k "not compile and not gradcheck and not property"
else
  note "memcheck   skipped: compute-sanitizer not found"
fi

step bench 240 $PY benchmarks/bench_block.py --gpu h100 --batch 128 --quiet --csv "$OUTDIR/bench_block.csv" \
  --plot "$OUTDIR/bench_block.png"
step network 120 $PY benchmarks/bench_network.py --gpu h100 --batch 128 --models resnet50,regnety400mf --quiet \
  --min-run-time 0.1 --csv "$OUTDIR/bench_network.csv"
step ablation 90 $PY benchmarks/ablation_fusion.py --gpu h100 --batch 128 --quiet --csv "$OUTDIR/ablation_fusion.csv"

echo
echo "=== bench_block (head) ==="
sed -n '1,24p' "$OUTDIR/bench.log"
echo
echo "=== ablation_fusion ==="
tail -n 9 "$OUTDIR/ablation.log"
echo
echo "=== summary ==="
cat "$summary"
