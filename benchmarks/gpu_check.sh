#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): CUDA checks, training tokens/s at GPU shapes and a Ray
# sweep of 8 dictionaries four to a GPU, printed as one table and written as JSON.
#
#   benchmarks/gpu_check.sh                          # one GPU, under 8 minutes; writes benchmarks/results/gpu.json
#   benchmarks/gpu_check.sh --smoke --out FILE.json  # tiny shapes on the CPU, to know it runs
#
# Python: $PYTHON, else the checkout's .venv, else python3. Stopped after $GPU_CHECK_TIMEOUT seconds
# (default 480) whatever happens; the JSON then holds the rows measured so far.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
# This checkout's package, also in the sweep's Ray workers; no hub downloads; no Ray telemetry.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
exec timeout --signal=TERM --kill-after=20 "${GPU_CHECK_TIMEOUT:-480}" "$python" "$here/gpu_check.py" "$@"
