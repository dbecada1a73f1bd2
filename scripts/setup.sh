#!/usr/bin/env bash
# Installs alignkit and what it needs. The CPU build of torch is pinned first, so that nothing pulls CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
