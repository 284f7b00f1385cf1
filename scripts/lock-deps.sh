#!/usr/bin/env bash
# Write the two dependency locks from pyproject.toml's ranges, with uv (`uv pip compile`).
#
#   scripts/lock-deps.sh             re-lock after a change to pyproject.toml (keeps every other pin)
#   scripts/lock-deps.sh --upgrade   take the newest releases the ranges allow, then install the CPU
#                                    lock into a fresh venv and run every test tier: an upgrade is a
#                                    deliberate commit of both locks after this passes
#
# requirements/cpu.txt   torch's CPU build (2.13.0+cpu), what CI and a CPU box install
# requirements/cuda.txt  torch's CUDA build from PyPI, for a Linux x86_64 GPU node
# Both are resolved for Python 3.11 on Linux x86_64 (manylinux_2_28) and carry the sha256 of every file of
# each pinned release, so `pip install -r` refuses anything else. Why uv: one fast resolver that writes a
# plain pip requirements file with hashes (pip installs it; users need no new tool), and resolves for
# another platform than the one it runs on (the CUDA lock is made on a CPU box).
# Environment: TORCH_VERSION (default 2.13.0), TORCH_CPU_WHEELS (a folder or index page with the +cpu
# wheels; default: PyTorch's CPU index, or /opt/wheels where it exists).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
upgrade=()
run_tests=0
for arg in "$@"; do
    case "$arg" in
        --upgrade) upgrade=(--upgrade); run_tests=1 ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "lock-deps: unknown option $arg" >&2; exit 2 ;;
    esac
done
command -v uv >/dev/null || { echo "lock-deps: uv not found (pip install -r requirements/cpu.txt brings it)" >&2; exit 1; }
if [[ -z "${TORCH_CPU_WHEELS:-}" ]]; then
    if [[ -d /opt/wheels ]]; then TORCH_CPU_WHEELS=/opt/wheels; else TORCH_CPU_WHEELS=https://download.pytorch.org/whl/cpu/torch/; fi
fi

common=(pyproject.toml --extra dev --extra tracking --python-version 3.11 --python-platform x86_64-manylinux_2_28
        --generate-hashes --no-header "${upgrade[@]}")
# the torch build each lock takes, in files of their own so the locks' "via" comments stay the same
echo "torch==${TORCH_VERSION}+cpu" > requirements/torch-cpu.txt
echo "torch==${TORCH_VERSION}" > requirements/torch-cuda.txt
uv pip compile "${common[@]}" -c requirements/torch-cpu.txt --find-links "$TORCH_CPU_WHEELS" -o requirements/cpu.txt
uv pip compile "${common[@]}" -c requirements/torch-cuda.txt -o requirements/cuda.txt

if (( run_tests )); then
    venv="$(mktemp -d)/venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q -r requirements/cpu.txt
    "$venv/bin/pip" install -q --no-deps -e .  # two lines: set -e does not stop inside an && chain
    # the vllm tier runs against the vLLM environment (built once, reused; its own pins: build-vllm-env.sh)
    scripts/build-vllm-env.sh --cpu "$HOME/.cache/tas-panel/venv-vllm"
    TAS_VLLM_PYTHON="$HOME/.cache/tas-panel/venv-vllm/bin/python" PATH="$venv/bin:$PATH" \
        python -m pytest -m "" -n 2 --dist loadscope
    echo "lock-deps: the upgraded locks pass every tier; commit requirements/*.txt"
fi
