#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv: idempotent, safe to run every time.
#   scripts/setup.sh            the package, the demo model, S3 stores, the test tools
#   scripts/setup.sh --cluster  + the `cluster` extra: what a Ray node or a native deployment runs
#                               (Ray's dashboard and job API, Ray Client, MLflow's auth app, psycopg)
#   scripts/setup.sh --test     + --cluster, and what the test suite needs beside the venv
#                               (scripts/setup-deploy-tools.sh: docker-compose v1, Debian's
#                               PostgreSQL, moto; apt needs root), which the demo does not.
# torch goes in first as the CPU build (TORCH_SPEC overrides it, e.g. TORCH_SPEC=torch on a GPU
# machine): a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=demo,s3,test
case "${1:-}" in
  "") ;;
  --cluster|--test) extras=$extras,cluster ;;
  *) echo "usage: scripts/setup.sh [--cluster | --test]" >&2; exit 2 ;;
esac
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
quiet_pip() {
  # This machine's pip config names extra package folders that may be absent; drop that noise only.
  .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
quiet_pip "${TORCH_SPEC:-torch==2.13.0}"
# Whatever torch is now installed stays: nothing below (sae-lens pulls transformer-lens) may swap it.
.venv/bin/python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > .venv/constraints.txt
quiet_pip -c .venv/constraints.txt -e ".[$extras]"
# dictionary_learning (the interchange tests) without its dependencies: nnsight names torchvision,
# whose PyPI build needs CUDA torch and breaks `import torchvision` on the CPU build (transformers
# imports it when present). What dictionary_learning imports is in the test extra.
quiet_pip --no-deps "dictionary-learning==0.1.0" "nnsight==0.3.7"
if [ "${1:-}" = "--test" ]; then
  bash scripts/setup-deploy-tools.sh
fi
