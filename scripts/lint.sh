#!/usr/bin/env bash
# Static checks, run by .ci/run before the tests: ruff (pyflakes, pycodestyle errors, import order,
# bugbear, pyupgrade) and mypy, both configured in pyproject.toml. Zero findings.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check sae_registry tests benchmarks jobs
.venv/bin/mypy
