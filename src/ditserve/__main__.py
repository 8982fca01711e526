"""`python -m ditserve ...` runs the `ditserve` command (for machines where it is not on PATH)."""

from ditserve.cli import main

raise SystemExit(main())
