#!/usr/bin/env bash
# Set-up, then the second main job: GRPO (LoRA) on ASDiv with SmolLM2-135M-Instruct and the correctness reward.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python scripts/grpo_job.py "$@"
