#!/usr/bin/env bash
# Set-up, then the main job: iterative DPO (LoRA) on ASDiv with SmolLM2-135M-Instruct, and alignkit eval of the result.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python scripts/main_job.py "$@"
