"""How the bench scripts report: the command line they show, and where their results go."""

from __future__ import annotations

import json
import sys
from typing import Any

__all__ = ["publish", "shown_args"]


def shown_args() -> str:
    """This run's arguments without output paths (they point into a scratch folder)."""
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg in ("--json", "--markdown"):
            skip = True
        else:
            args.append(arg)
    return " ".join(args)


def publish(text: str, results: Any, markdown: str | None, json_path: str | None) -> None:
    """Print the markdown section; append it to `markdown` and write `results` to `json_path` if given."""
    print(text)
    if markdown:
        with open(markdown, "a") as f:
            f.write("\n" + text)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
