"""How a benchmark hands over its result: indented JSON in ``--out`` (when given) and on stdout
with ``--json``, else a few readable lines."""

from __future__ import annotations

import json
from collections.abc import Iterable


def emit(result: dict, *, out: str | None, as_json: bool, lines: Iterable[str]) -> None:
    """Write ``result`` to ``out`` as indented JSON (if given); print it (``as_json``) or ``lines``."""
    text = json.dumps(result, indent=2)
    if out:
        with open(out, "w") as fh:
            fh.write(text + "\n")
    print(text if as_json else "\n".join(lines))
