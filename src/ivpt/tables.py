"""Plain-text tables for the terminal and CSV files for machines: one way to write each."""
from __future__ import annotations

import csv
import io
from pathlib import Path



def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def write_csv(path: str | Path, rows: list[dict], first: tuple[str, ...] = ()) -> None:
    """Every key of every row becomes a column (``first`` ones leading), written atomically."""
    from .engine.checkpoint import atomic_write

    fields = list(dict.fromkeys([*first, *(k for row in rows for k in row)]))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(Path(path), lambda tmp: tmp.write_text(buffer.getvalue()))
