#!/usr/bin/env bash
# Create or update the project virtual environment (.venv) with everything the
# local path needs: clients, model preparation, vLLM and a Triton server build.
# Idempotent: a second run with unchanged requirements returns in a second.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/setup.sh [--cpu | --gpu | --compat] [--wheel-dir DIR] [--system-site-packages] [--force]

Creates .venv/ and installs into it:
  requirements.txt            clients and model preparation
  requirements/serve-cpu.txt  vLLM for x86 CPUs (default without an NVIDIA GPU)
  requirements/serve-gpu.txt  vLLM built for CUDA (default with an NVIDIA GPU)
  requirements/serve-compat.txt  the Docker image's vLLM version, built for CPUs (--compat)
  requirements/test.txt       pytest and linters
  Triton Inference Server 2.51 with its Python backend, from the
  nvidia-pytriton wheel, under .venv/tritonserver/

Options:
  --cpu            install the CPU build of vLLM even if a GPU is present
  --gpu            install the CUDA build of vLLM even if no GPU is detected
  --compat         install the CPU build of the vLLM version in the pinned Docker
                   image (make test-compat uses it, with VENV=.venv-compat)
  --wheel-dir DIR  install offline from a folder of wheels (air-gapped hosts);
                   the folder must hold every wheel, nvidia-pytriton included
  --system-site-packages
                   let .venv see the interpreter's packages (reuse a CUDA torch
                   already installed on the host instead of downloading one)
  --force          reinstall even if the environment looks up to date
  -h, --help       show this help

Environment: PYTHON (interpreter for the venv, default python3),
VENV (default .venv), SETUP_WHEEL_DIR (same as --wheel-dir).
Exit codes: 0 ready, 1 installation failed, 2 bad usage.
EOF
}

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
WHEEL_DIR=${SETUP_WHEEL_DIR:-}
TRITON_WHEEL=nvidia-pytriton==0.7.0
flavor=""
force=0
venv_args=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu) flavor=cpu ;;
    --gpu) flavor=gpu ;;
    --compat) flavor=compat ;;
    --wheel-dir) WHEEL_DIR=${2:?--wheel-dir needs a folder}; shift ;;
    --system-site-packages) venv_args+=(--system-site-packages) ;;
    --force) force=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "setup: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [[ -z "$flavor" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    flavor=gpu
  else
    flavor=cpu
  fi
fi

requirements=(requirements.txt "requirements/serve-$flavor.txt" requirements/test.txt)
stamp="$VENV/.setup-stamp"
fingerprint="$flavor $TRITON_WHEEL $("$PYTHON" -V 2>&1) $(cat "${requirements[@]}" | sha256sum | cut -c1-16)"

if [[ $force -eq 0 && -f "$stamp" && "$(cat "$stamp")" == "$fingerprint" ]]; then
  echo "setup: $VENV is up to date ($flavor)."
  exit 0
fi

pip_args=(--quiet --disable-pip-version-check)
if [[ -n "$WHEEL_DIR" ]]; then
  [[ -d "$WHEEL_DIR" ]] || { echo "setup: --wheel-dir '$WHEEL_DIR' is not a folder" >&2; exit 2; }
  pip_args+=(--no-index --find-links "$WHEEL_DIR")
fi

echo "setup: installing the $flavor environment into $VENV (first run takes a few minutes)..."
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "${venv_args[@]}" "$VENV"
pip=("$VENV/bin/python" -m pip)
if [[ ${#venv_args[@]} -gt 0 ]]; then
  # An interpreter that is itself a virtual environment (the python3 of some GPU
  # images) does not pass its packages on through --system-site-packages: list its
  # site-packages in a .pth file, after .venv's own, so .venv's pins still win.
  host_sites=$("$PYTHON" -c 'import site, sys; print("\n".join(site.getsitepackages()) if sys.prefix != sys.base_prefix else "")')
  venv_site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  if [[ -n "$host_sites" ]]; then
    echo "$host_sites" > "$venv_site/host-site-packages.pth"
  fi
fi

"${pip[@]}" install "${pip_args[@]}" -r "requirements/serve-$flavor.txt" -r requirements/test.txt
# Separately, because vLLM's own dependencies ask for numpy 2 while Triton 2.51's
# Python-backend stub needs numpy 1.x; vLLM's text generation runs with 1.26.
"${pip[@]}" install "${pip_args[@]}" -r requirements.txt
# vision/audio packages pulled in by vLLM fail to import beside the CPU torch
# build and break transformers' model imports; text generation needs none of them.
"${pip[@]}" uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

wheels="$VENV/wheels"
mkdir -p "$wheels"
if [[ -n "$WHEEL_DIR" ]]; then
  cp "$WHEEL_DIR"/nvidia_pytriton-*.whl "$wheels"/
else
  "${pip[@]}" download "${pip_args[@]}" --no-deps --only-binary=:all: -d "$wheels" "$TRITON_WHEEL"
fi
"$VENV/bin/python" -m serving.tritonserver install "$wheels"/nvidia_pytriton-*.whl "$VENV/tritonserver"

echo "$fingerprint" > "$stamp"
echo "setup: ready. Triton: $VENV/tritonserver/bin/tritonserver"
