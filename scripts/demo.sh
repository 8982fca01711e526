#!/usr/bin/env bash
# Install ditserve into .venv and generate a clip with its embedded tiny model on this machine's CPU:
# no download beyond the packages, a few seconds of generation. Extra arguments go to `ditserve generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e .
mkdir -p out
ditserve generate --prompt "a red circle moving left on a blue background" --device cpu --output out/demo.gif "$@"
