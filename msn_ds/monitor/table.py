"""The fixed-width text tables that the benchmarks and the evaluations print: a column is a
title, a width, an alignment and a format for its values, so the header always lines up
with the rows."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union


@dataclass(frozen=True)
class Column:
    title: str
    width: int
    spec: str = ""  # how values are formatted after alignment and width, e.g. ".2f"
    align: str = ">"


def format_header(columns: Sequence[Column], sep: str = "") -> str:
    return sep.join(format(c.title, f"{c.align}{c.width}") for c in columns)


def format_row(columns: Sequence[Column], values: Sequence[Any], sep: str = "") -> str:
    """The first ``len(values)`` columns; a wider value pushes the rest right, never cut."""
    return sep.join(format(v, f"{c.align}{c.width}{c.spec}") for c, v in zip(columns, values))


def format_table(columns: Sequence[Column], rows: Sequence[Union[Sequence[Any], str]],
                 sep: str = "", rule: bool = False, title: str = "") -> str:
    """``title`` (if any), the header, a rule of dashes under it (``rule``), one line per
    row; a row given as a string is a line of its own (an error, a summary)."""
    head = format_header(columns, sep)
    lines = ([title] if title else []) + [head] + (["-" * len(head)] if rule else [])
    lines += [r if isinstance(r, str) else format_row(columns, r, sep) for r in rows]
    return "\n".join(lines)
