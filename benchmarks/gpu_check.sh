#!/usr/bin/env bash
# The one prepared check for a machine with a GPU (no internet needed): build the extension for the
# visible GPU (or take a matching prebuilt one), run the CUDA tests with the SIMT kernels, again with
# the tensor cores on, and once more with the experimental paths on, compute-sanitizer's memcheck over
# the sparse kernels, the tensor-core benchmark with a kernel trace, Nsight Compute over the tensor-core
# GEMMs, the block benchmark (tensor-core kernels, then cuDNN composites) and a profile of the blocks'
# kernels, the experimental-path and fusion-ablation benchmarks, and write the summary to
# benchmarks/results/gpu-<device>-<commit>.md.
# Fits one 600 s device call: the step caps add up to at most 540 s (the network benchmark is left
# out; run benchmarks/bench_network.py on its own).
#
#   bash benchmarks/gpu_check.sh            # results go to $OUT, or benchmarks/out/gpu
#
# What comes back: logs.tgz (every log and CSV, repacked after each step, so a cut-off run still
# returns what it did), the report, and the built extension as _C.so.gz + _C.key. A later call on the
# same image can skip the build with GPU_CHECK_PREBUILT=<folder holding those two files>;
# GPU_CHECK_BUILD_ONLY=1 makes a call that only builds (up to 500 s) and returns them. To build
# ahead on a machine without a GPU, with the GPU machine's torch version installed there:
#   TORCH_CUDA_ARCH_LIST=9.0 LAUDNET_OPS_CUDA=1 python setup.py build_ext --inplace
#   mkdir -p .gpu_build && gzip -c laudnet_ops/_C.abi3.so >.gpu_build/_C.so.gz
#   bash benchmarks/build_key.sh python 9.0 >.gpu_build/_C.key
#
# CUTLASS headers (for the tensor-core kernels; without them those are not built and their tests skip):
# the nvidia-cutlass package when importable, else LAUDNET_OPS_CUTLASS_DIR, else .cutlass/include
# (ignored by git; stage it on a machine that has the package and carry it to the GPU machine:
#   mkdir -p .cutlass && cp -r "$(python -c 'import cutlass_library, os; print(os.path.dirname(
#       cutlass_library.__file__))')/source/include" .cutlass/          # 27 MB of headers
# ), else the nvidia-cutlass wheel in .whl/ (unpacked, not installed).
set -uo pipefail
cd "$(dirname "$0")/.."

RESULTS_DIR="${OUT:-benchmarks/out/gpu}"          # what comes back: logs.tgz, the report, the built .so
LOGDIR=benchmarks/out/gpu-logs                      # every log and CSV, packed into logs.tgz after each step
mkdir -p "$RESULTS_DIR" "$LOGDIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The commit under test: GPU_CHECK_COMMIT where the copy of the tree has no git history.
COMMIT="${GPU_CHECK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
summary="$LOGDIR/summary.txt"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }
pack() { tar czf "$RESULTS_DIR/logs.tgz" -C "$LOGDIR" . 2>/dev/null; }

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $LOGDIR/NAME.log, record the outcome
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$LOGDIR/$name.log" 2>&1
  local rc=$?
  local verdict="ok"
  [ $rc -eq 0 ] || verdict="FAILED (rc=$rc)"
  [ $rc -eq 124 ] && verdict="TIMED OUT after ${limit}s"
  note "$(printf '%-13s %-22s %4ss  %s' "$name" "$verdict" $((SECONDS - start)) "$(tail -n 1 "$LOGDIR/$name.log" | cut -c1-90)")"
  pack
  return $rc
}

# (file modes are ignored: a copy of the tree made for another machine may not keep them)
git -c core.fileMode=false diff --quiet 2>/dev/null; [ $? -eq 1 ] && COMMIT="$COMMIT (with local changes)"
note "commit:  $COMMIT"
note "device:  $($PY -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"{p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory >> 30} GiB")' 2>&1)"
note "torch:   $($PY -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
note "nvcc:    $(nvcc --version 2>/dev/null | tail -n 2 | head -n 1)"
note "driver:  $(nvidia-smi --query-gpu=driver_version,clocks.sm,clocks.max.sm --format=csv,noheader 2>/dev/null)"

if [ -z "${LAUDNET_OPS_CUTLASS_DIR:-}" ] && ! $PY -c 'import cutlass_library' 2>/dev/null \
    && [ -f .cutlass/include/cutlass/cutlass.h ]; then
  export LAUDNET_OPS_CUTLASS_DIR="$PWD/.cutlass/include"
fi
if ls .whl/nvidia_cutlass-*.whl >/dev/null 2>&1 && [ -z "${LAUDNET_OPS_CUTLASS_DIR:-}" ]; then
  rm -rf /tmp/cutlass_site && mkdir -p /tmp/cutlass_site
  $PY -m zipfile -e .whl/nvidia_cutlass-*.whl /tmp/cutlass_site
  export LAUDNET_OPS_CUTLASS_DIR=/tmp/cutlass_site/cutlass_library/source/include
fi

note "cutlass: ${LAUDNET_OPS_CUTLASS_DIR:-$($PY -c 'import cutlass_library; print("nvidia-cutlass package")' 2>/dev/null || echo 'not found: tensor-core kernels not built')}"

ARCH=$($PY -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"{p.major}.{p.minor}")')
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
# A build made elsewhere for the same torch and GPU (GPU_CHECK_PREBUILT=<folder holding _C.so.gz and
# _C.key>, e.g. what an earlier call returned) is used when its key -- sources, torch, arch -- matches
# and it imports; else the extension is built here. The extension is abi3, so Python's version is no part.
KEY="$(bash benchmarks/build_key.sh "$PY" "$ARCH")"
rm -rf build laudnet_ops/_C*.so
if [ -n "${GPU_CHECK_PREBUILT:-}" ] && [ "$(cat "$GPU_CHECK_PREBUILT/_C.key" 2>/dev/null)" = "$KEY" ] \
    && gunzip -c "$GPU_CHECK_PREBUILT/_C.so.gz" >laudnet_ops/_C.abi3.so \
    && $PY -c 'import laudnet_ops, sys; sys.exit(laudnet_ops._library.extension_error)'; then
  note "build         prebuilt $KEY"
elif [ "${GPU_CHECK_BUILD_ONLY:-0}" = 1 ]; then
  # A call of its own when no prebuilt extension is at hand: build with a long cap, return the
  # extension (_C.so.gz, _C.key), stop; the next call takes it with GPU_CHECK_PREBUILT.
  step build-only 500 env LAUDNET_OPS_CUDA=1 $PY setup.py build_ext --inplace \
    && gzip -c laudnet_ops/_C*.so >"$RESULTS_DIR/_C.so.gz" && echo "$KEY" >"$RESULTS_DIR/_C.key"
  rc=$?
  grep -m 20 -E "error|Error" "$LOGDIR/build-only.log"
  exit $rc
else
  rm -f laudnet_ops/_C*.so
  if ! step build 140 env LAUDNET_OPS_CUDA=1 $PY setup.py build_ext --inplace; then
    grep -m 20 -E "error|Error" "$LOGDIR/build.log"
    cat "$summary"
    exit 1
  fi
  gzip -c laudnet_ops/_C*.so >"$RESULTS_DIR/_C.so.gz" && echo "$KEY" >"$RESULTS_DIR/_C.key"
fi

# One device call may run 600 s: the step caps below add up to at most 540 s (tests/test_tensor_cores.py
# checks). The CUDA tests run three times: every call on the SIMT kernels, with the tensor cores on, and
# with the experimental paths (not yet run on a GPU before: docs/ops.md) on as well.
# About 5000 CUDA cases: in parallel with pytest-xdist (a machine without internet takes it from .whl/:
#   pip download --no-deps -d .whl pytest-xdist execnet   # pure-Python wheels, any Python 3
# ). Without it the first run leaves out the 2240 shape cases of channel_gated_conv2d_add_ (on CUDA the
# unfused composite of channel_gated_conv2d, whose own cases run) to fit its cap.
if ! $PY -c 'import xdist' 2>/dev/null && ls .whl/pytest_xdist-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --find-links .whl pytest-xdist >/dev/null 2>&1
fi
FAST_TESTS=(-m cuda -q -p no:cacheprovider -rfE -k "not property and not compile")  # inductor compiles take minutes
ALL_CUDA_TESTS=(-k "not property and not compile")
if $PY -c 'import xdist' 2>/dev/null; then
  FAST_TESTS+=(-n 8)
  note "pytest:  xdist, 8 workers"
else
  ALL_CUDA_TESTS=(-k "not property and not compile and not (conv2d_add and matches_reference)")
  note "pytest:  no xdist: channel_gated_conv2d_add_'s shape cases left out of the first run"
fi
step cuda-tests 70 env LAUDNET_OPS_TENSOR_CORES=0 $PY -m pytest tests --maxfail=40 "${FAST_TESTS[@]}" \
  "${ALL_CUDA_TESTS[@]}"
step tc-tests 35 env LAUDNET_OPS_TENSOR_CORES=1 $PY -m pytest tests/test_tensor_cores.py tests/test_gather_conv2d.py \
  tests/test_masker_conv1x1.py tests/test_channel_gated_conv2d.py tests/test_conv1x1_scatter_add.py \
  tests/test_nn_blocks.py --maxfail=40 "${FAST_TESTS[@]}"
step exp-tests 50 env LAUDNET_OPS_TENSOR_CORES=1 LAUDNET_OPS_EXPERIMENTAL=1 $PY -m pytest tests/test_tensor_cores.py \
  tests/test_gather_conv2d.py tests/test_gather_conv2d_tiles.py tests/test_channel_gated_conv2d.py \
  tests/test_masker_conv1x1.py tests/test_conv1x1_scatter_add.py tests/test_conv1x1_composites.py \
  tests/test_nn_blocks.py tests/test_nn_gather_conv.py tests/test_channel_gated_sample_groups.py \
  tests/test_layer_skip.py tests/test_scatter_add.py tests/test_cudnn_composites.py tests/test_known_indices.py \
  --maxfail=40 "${FAST_TESTS[@]}"

# memcheck on the sparse kernels: the tensor-core ones (the experimental grouped GEMM included), the
# SIMT ones (layouts, borders, empty inputs), and the experimental vector kernels.
if command -v compute-sanitizer >/dev/null 2>&1; then
  step memcheck 15 env LAUDNET_OPS_TENSOR_CORES=1 LAUDNET_OPS_EXPERIMENTAL=1 compute-sanitizer --tool memcheck --error-exitcode 3 \
    $PY -m pytest tests/test_tensor_cores.py -m cuda -q -p no:cacheprovider \
    -k "float16 and not bfloat16 and (N2_C16 or N2_C32 or N3_C8) and not all_on and not all_off"
  step memcheck-simt 15 env LAUDNET_OPS_TENSOR_CORES=0 compute-sanitizer --tool memcheck --error-exitcode 3 \
    $PY -m pytest tests/test_gather_conv2d.py tests/test_scatter_add.py tests/test_layer_skip.py \
    tests/test_conv1x1_scatter_add.py tests/test_patch_indices.py tests/test_masker_conv1x1.py \
    tests/test_channel_gated_conv2d.py -m cuda -q -p no:cacheprovider -k "memory_formats or empty_inputs \
    or border_zeros or inplace_touches or small_map_many_outputs or inactive_outputs or unordered or large_grid"
  # the experimental 16-byte vector kernels of the layer-skipping and scatter ops
  step memcheck-vec 15 env LAUDNET_OPS_EXPERIMENTAL=1 compute-sanitizer --tool memcheck --error-exitcode 3 \
    $PY -m pytest tests/test_layer_skip.py tests/test_scatter_add.py -m cuda -q -p no:cacheprovider \
    -k "row_vectors or channel_vectors"
else
  note "memcheck      skipped: compute-sanitizer not found"
fi

# The tensor-core kernels, then again with the experimental row-by-row epilogue (no SIMT columns).
step bench-tc 30 bash -c "$PY benchmarks/bench_tensor_cores.py --batch 128 --min-ms 40 --kernel-trace \
  --csv $LOGDIR/bench_tensor_cores.csv && LAUDNET_OPS_EXPERIMENTAL=1 $PY benchmarks/bench_tensor_cores.py \
  --batch 128 --min-ms 40 --no-simt --csv $LOGDIR/bench_tensor_cores_rows.csv"
# Nsight Compute on the tensor-core GEMMs at stage 2 (each op runs twice; all eight launches profiled).
if command -v ncu >/dev/null 2>&1; then
  step ncu 30 ncu --clock-control none -k regex:gather_gemm --launch-count 8 --section SpeedOfLight \
    --section Occupancy --section LaunchStats --section WarpStateStats --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis $PY benchmarks/bench_tensor_cores.py --ncu --stages stage2
else
  note "ncu           skipped: Nsight Compute not found"
fi
# Channel skipping at G = 16: the tensor-core kernel needs gate groups of a multiple of 8 channels.
PROFILE=$($PY -c 'import torch; print("h200" if "H200" in torch.cuda.get_device_name() else "h100")')
BLOCK_ARGS=(--gpu $PROFILE --batch 128 --dtype fp16 --rates 0.5 --quiet --min-run-time 0.05)
step bench-on 20 env LAUDNET_OPS_TENSOR_CORES=1 $PY benchmarks/bench_block.py "${BLOCK_ARGS[@]}" \
  --modes dense,spatial,layer --csv "$LOGDIR/bench_block.csv"
step bench-ch 15 env LAUDNET_OPS_TENSOR_CORES=1 $PY benchmarks/bench_block.py "${BLOCK_ARGS[@]}" \
  --modes dense,channel --granularity 16 --no-unfused --csv "$LOGDIR/bench_block_channel.csv"
# Where the blocks' time goes (their kernels, the GPU's idle share, host syncs): the validated paths,
# then one block with the experimental ones (vector kernels, fewer syncs).
step profile 20 bash -c "LAUDNET_OPS_TENSOR_CORES=1 $PY benchmarks/profile_block.py --batch 128 --dtype fp16 \
  --modes dense,spatial,layer && LAUDNET_OPS_TENSOR_CORES=1 LAUDNET_OPS_EXPERIMENTAL=1 $PY \
  benchmarks/profile_block.py --batch 128 --dtype fp16 --block resnet101:layer3.1 --modes spatial,layer"
step bench-exp 25 $PY benchmarks/bench_experimental.py --batch 128 --min-ms 20 --csv "$LOGDIR/bench_experimental.csv"
# The same float16 blocks with every sparse convolution on its cuDNN composite and the experimental
# vector kernels (channel skipping at the default G = 2, which no tensor-core kernel takes): which
# strategy wins per block.
step bench-cudnn 20 env LAUDNET_OPS_TENSOR_CORES=1 LAUDNET_OPS_EXPERIMENTAL=1 LAUDNET_OPS_CUDNN_COMPOSITES=1 \
  $PY benchmarks/bench_block.py "${BLOCK_ARGS[@]}" --modes dense,spatial,channel,layer --no-unfused \
  --csv "$LOGDIR/bench_block_cudnn.csv"
# float32 spatial blocks with the experimental paths (cuDNN under the sparse ops) instead of SIMT kernels
step bench-exp-fp32 15 env LAUDNET_OPS_EXPERIMENTAL=1 $PY benchmarks/bench_block.py --gpu $PROFILE --batch 128 \
  --dtype fp32 --rates 0.5 --quiet --min-run-time 0.05 --modes dense,spatial --csv "$LOGDIR/bench_block_exp_fp32.csv"
step ablation 25 env LAUDNET_OPS_TENSOR_CORES=1 $PY benchmarks/ablation_fusion.py --gpu $PROFILE --batch 128 \
  --dtype fp16 --measure cuda --min-run-time 0.05 --quiet --csv "$LOGDIR/ablation_fusion.csv"

report() {  # the summary and the tables, as markdown
  echo "# GPU check $COMMIT"
  echo
  echo '```'
  cat "$summary"
  echo '```'
  for part in bench-tc:bench_tensor_cores "bench-on:bench_block" \
      "bench-ch:bench_block, channel skipping at G = 16" "profile:profile_block" "bench-exp:bench_experimental" \
      "bench-cudnn:bench_block, float16 on the cuDNN composites" \
      "bench-exp-fp32:bench_block, float32, experimental paths" \
      "ablation:ablation_fusion"; do
    echo
    echo "## ${part#*:}"
    echo
    echo '```'
    sed -n '1,120p' "$LOGDIR/${part%%:*}.log" 2>/dev/null
    echo '```'
  done
  if [ -f "$LOGDIR/ncu.log" ]; then
    echo
    echo "## Nsight Compute, tensor-core GEMMs at stage 2 (key lines; the whole report is in logs.tgz)"
    echo
    echo '```'
    grep -E "gather_gemm_kernel|Duration|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit (Registers|Shared)|Issued Ipc|Warp Cycles Per Issued" \
      "$LOGDIR/ncu.log" | sed -E 's/ +/ /g' | cut -c1-150
    echo '```'
  fi
}
DEVICE_TAG=$($PY -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-"))' 2>/dev/null || echo unknown)
mkdir -p benchmarks/results
RESULT="benchmarks/results/gpu-${DEVICE_TAG}-${COMMIT%% *}.md"
report >"$RESULT"
cp "$RESULT" "$RESULTS_DIR/" 2>/dev/null
pack
echo
cat "$RESULT"
echo "written: $RESULT"
