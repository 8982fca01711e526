#!/usr/bin/env bash
# Install ditserve with its test dependencies into .venv and run the CPU test suite.
# torch is installed first and pinned to the CPU build so that pip never pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
# Triton (the device's version) on a CPU machine only compiles: tests/test_fp8_attention_compiles.py builds our
# FP8 attention kernel for Hopper with it, so a launch that would not compile fails here, not on a GPU.
python -m pip install -q "triton==3.6.0"
python -m pip install -q -e ".[test,ray]"
python -m pytest -q "$@"
