#!/usr/bin/env bash
# Runs the benchmarks once on this machine's CPU and writes benchmarks/results/cpu.md (tables as printed,
# load average, commit, commands) with the CSVs and PNG plots beside it. Run from anywhere:
#
#   bash benchmarks/results/run_cpu.sh            # PYTHON=... to choose the interpreter
#
# Both cores (torch threads = 2) on the wall clock, so run it on an otherwise idle machine. Not one
# thread: with one thread PyTorch runs small-batch 1x1 convolutions on its native path instead of
# oneDNN (about 3x slower here), which would flatter every dynamic variant.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"
OUT=benchmarks/results/cpu
MD=benchmarks/results/cpu.md
mkdir -p "$OUT"
COMMON="--measure cpu --threads 2 --quiet"

commands=(
  "benchmarks/bench_block.py --gpu v100 $COMMON --cpu-batch 8 --min-run-time 0.2 --csv $OUT/bench_block.csv --plot $OUT/bench_block.png"
  "benchmarks/bench_block.py --gpu v100 $COMMON --modes dense,spatial,channel,layer --rates 0.5 --batch-sweep 1,2,4,8,16,32,64,128,256 --sweep-max-measured 16 --min-run-time 0.2 --csv $OUT/batch_sweep.csv --plot $OUT/batch_sweep.png"
  "benchmarks/ablation_fusion.py --gpu v100 $COMMON --cpu-batch 8 --min-run-time 0.3 --csv $OUT/ablation_fusion.csv"
  "benchmarks/bench_network.py --gpu v100 $COMMON --cpu-batch 1 --min-run-time 0.3 --csv $OUT/bench_network.csv --plot $OUT/bench_network.png"
  "benchmarks/bench_spatial_ops.py --threads 2 --min-run-time 0.3 --csv $OUT/spatial_ops.csv"
  "benchmarks/bench_channel_layer_ops.py --threads 2 --rounds 5 --min-run-time 0.3 --csv $OUT/channel_layer_ops.csv"
  "benchmarks/bench_models.py --threads 2 --rounds 3 --min-run-time 1.5 --csv $OUT/models.csv"
)

{
  echo "# Benchmarks on this CPU"
  echo
  echo "- commit: \`$(git rev-parse --short HEAD)\`$(git diff --quiet || echo ' (with local changes)')"
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores visible"
  echo "- torch: $($PY -c 'import torch; print(torch.__version__)')"
  echo "- load before: \`$(uptime)\`"
  echo
} >"$MD.head"

: >"$MD.body"
for cmd in "${commands[@]}"; do
  echo "running: $PY $cmd" >&2
  start=$SECONDS
  log=$($PY $cmd 2>&1 | grep -v "cpp_extension.py")
  {
    echo "## \`python $cmd\`"
    echo
    echo "load after: \`$(uptime | sed 's/.*load/load/')\`, $((SECONDS - start)) s"
    echo
    echo '```'
    echo "$log"
    echo '```'
    echo
  } >>"$MD.body"
done
cat "$MD.head" "$MD.body" >"$MD"
rm -f "$MD.head" "$MD.body"
echo "wrote $MD" >&2
