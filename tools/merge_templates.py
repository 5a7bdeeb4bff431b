"""Combine merge templates into one, for ``chalice package --merge-template``, which takes only one.

The onnx-snapstart stage needs two: .chalice/merge-template-snapstart.json
(the API on published versions behind an alias) and
.chalice/merge-template-bulk.json (the bulk worker's queue, permissions and
event source mapping). They are combined the way Chalice merges a template
into its own (objects merged key by key, anything else replaced), except
that here neither may replace the other: two templates that set the same
property to different values are refused, naming the property, since the
template given last would otherwise win without a word.

    python -m tools.merge_templates .chalice/merge-template-snapstart.json \\
        .chalice/merge-template-bulk.json --output build/onnx-project/merge-template-onnx-snapstart.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class MergeConflict(ValueError):
    """Two templates set one property to different values."""


def merge(first: Any, second: Any, path: str = "") -> Any:
    """``first`` and ``second`` together; objects are merged key by key, other values must agree."""
    if isinstance(first, dict) and isinstance(second, dict):
        merged = dict(first)
        for key, value in second.items():
            merged[key] = merge(first[key], value, f"{path}/{key}") if key in first else value
        return merged
    if first != second:
        raise MergeConflict(f"the templates disagree on {path or 'the whole template'}")
    return first


def merge_files(sources: Sequence[Path]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for source in sources:
        merged = merge(merged, json.loads(source.read_text()))
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("templates", type=Path, nargs="+")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    try:
        merged = merge_files(args.templates)
    except MergeConflict as conflict:
        raise SystemExit(f"cannot merge {', '.join(map(str, args.templates))}: {conflict}") from conflict
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(merged, indent=2) + "\n")


if __name__ == "__main__":
    main()
