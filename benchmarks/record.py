"""Shared by the benchmark scripts: print a record's numbers as a table and write it as JSON."""

from __future__ import annotations

import json
from pathlib import Path


def report(title: str, record: dict, keys: list[str] | tuple[str, ...], out: str | Path, fmt: str = "10.3f") -> None:
    print(title)
    for key in keys:
        print(f"  {key:28s} {record[key]:{fmt}}")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")
