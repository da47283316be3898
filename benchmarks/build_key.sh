#!/usr/bin/env bash
# The key of a build of the extension: its sources, the torch it is built against, the GPU arch.
#   bash benchmarks/build_key.sh PYTHON ARCH        e.g.  bash benchmarks/build_key.sh python3 9.0
# gpu_check.sh uses a prebuilt extension only when this key matches the one saved beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
sources=$( (cat setup.py; find csrc -type f | LC_ALL=C sort | xargs cat) | sha1sum | cut -c1-16)
echo "$sources-torch$("$1" -c 'import torch; print(torch.__version__)')-sm$2"
