#!/usr/bin/env bash
# What tests/test_deploy.py needs beyond the project's .venv (scripts/setup.sh --test makes that first,
# with the cluster extra: Ray's dashboard and job API, which the test's native deployment starts).
# Idempotent, quiet, and quick when everything is already there:
#   - docker-compose v1 in its own venv, .venv-compose (it pins PyYAML<6 and jsonschema<4, which
#     clash with the project's), to check docker-compose.yml without a Docker engine;
#   - PostgreSQL's server binaries (Debian's postgresql package), unshare/nsenter and ip: the test
#     runs the compose services natively inside a private network namespace;
#   - Debian's chromium (+ a font), in which tests/test_cards.py renders the feature-card page headless;
#   - moto[server] (the S3 stand-in for MinIO) and psycopg[binary] in .venv: MLflow's PostgreSQL driver
#     (SQLAlchemy 2.1 opens postgresql:// URIs with psycopg 3, no longer psycopg2).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

quiet_pip() {
  # This machine's pip config names extra package folders that may be absent; drop that noise only.
  "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

cleanup=()
trap 'rm -f "${cleanup[@]}"' EXIT

# docker-compose v1. PyYAML 5.4.1 (its pin) has no wheel for this Python and builds only with Cython<3.
if ! .venv-compose/bin/docker-compose version >/dev/null 2>&1; then
  rm -rf .venv-compose
  "$python" -m venv .venv-compose
  constraints=$(mktemp); cleanup+=("$constraints")
  echo 'cython<3' >"$constraints"
  PIP_CONSTRAINT=$constraints quiet_pip .venv-compose/bin/python -m pip install -q --disable-pip-version-check \
    docker-compose==1.29.2
fi

# System packages: PostgreSQL server, util-linux (unshare, nsenter, runuser), iproute2 (ip), chromium.
missing=()
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || missing+=(postgresql)
command -v unshare >/dev/null && command -v nsenter >/dev/null || missing+=(util-linux)
command -v ip >/dev/null || missing+=(iproute2)
command -v chromium >/dev/null || missing+=(chromium fonts-dejavu-core)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup-deploy-tools: need root to install ${missing[*]} (apt-get install ${missing[*]})" >&2
    exit 1
  fi
  # The package would start its own cluster on port 5432: forbid service starts while installing.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    cleanup+=(/usr/sbin/policy-rc.d)
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Into the project's venv.
if [ ! -x .venv/bin/python ]; then
  echo "setup-deploy-tools: no .venv here; run scripts/setup.sh first" >&2
  exit 1
fi
if [ ! -x .venv/bin/moto_server ] || ! .venv/bin/python -c "import psycopg, moto.server" 2>/dev/null; then
  quiet_pip .venv/bin/python -m pip install -q --disable-pip-version-check "moto[server]>=5,<6" "psycopg[binary]>=3.1"
fi
