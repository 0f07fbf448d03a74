"""A case's result, and its rendering as a text table (stdout) and Markdown."""

from __future__ import annotations

__all__ = ["CaseResult", "format_markdown", "format_text"]

import dataclasses
from typing import Any


@dataclasses.dataclass
class CaseResult:
    """Rows of one case (dicts keyed by ``columns``), notes printed under them, and raw details."""

    name: str
    description: str
    columns: list[str]
    rows: list[dict[str, Any]]
    notes: list[str] = dataclasses.field(default_factory=list)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return str(value)  # numbers come rounded by the case


def _cells(case: CaseResult) -> list[list[str]]:
    return [[_cell(row.get(column)) for column in case.columns] for row in case.rows]


def format_text(case: CaseResult) -> str:
    cells = _cells(case)
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(case.columns)]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths)))

    out = [f"== {case.name}: {case.description}", line(case.columns), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    out += [f"  {note}" for note in case.notes]
    return "\n".join(out)


def format_markdown(case: CaseResult) -> str:
    out = [f"## {case.name}", "", case.description, "", "| " + " | ".join(case.columns) + " |",
           "|" + "|".join("---" if i == 0 else "---:" for i in range(len(case.columns))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in _cells(case)]
    if case.notes:
        out += [""] + [f"- {note}" for note in case.notes]
    return "\n".join(out) + "\n"
