#!/usr/bin/env bash
# Install ditserve into .venv and run its main job on this machine's CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e .
ditserve bench-attention --device cpu "$@"
