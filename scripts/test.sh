#!/usr/bin/env bash
# Set-up, then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python -m pytest "$@"
