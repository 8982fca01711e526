"""Run a snippet under Triton's interpreter (CPU), in a process of its own: the interpreter is chosen at import."""

from __future__ import annotations

import os
import subprocess
import sys


def run_interpreted(source: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -c source` with TRITON_INTERPRET=1; its stdout and stderr captured as text."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-c", source], env=env, capture_output=True, text=True, timeout=timeout)
