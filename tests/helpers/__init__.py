"""Test helpers, importable as `helpers.*` (pyproject.toml puts tests/ on pytest's pythonpath).

- `checkpoints`: tiny random diffusers-format pipeline folders, built offline;
- `server`: the HTTP server in a thread, and a pipeline wrapper that gates batched steps;
- `triton_interpreter`: a snippet run under Triton's interpreter, in a process of its own.
"""
