#!/usr/bin/env bash
# Set-up, then the main job: DPO (LoRA) on the ASDiv preference set with SmolLM2-135M-Instruct.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python scripts/main_job.py "$@"
