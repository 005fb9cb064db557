"""The one way a benchmark prints its result: a markdown table of one row, appended to --out if given."""
from __future__ import annotations

from pathlib import Path


def print_row(columns: list[str], row: str, out: Path | None, numeric: int) -> None:
    """Print `columns` as a header (the `numeric` after the first right-aligned), then `row`; append `row` to `out`."""
    print("| " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * numeric + "---|" * (len(columns) - 1 - numeric))
    print(row)
    if out:
        with out.open("a") as file:
            file.write(row + "\n")
