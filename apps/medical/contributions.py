"""The monthly contribution file each employer (insured unit) sends: one row per person and insurance.

CSV, UTF-8 (a BOM is accepted), with this header, in any column order:

    month,employer,id_number,insurance,base_fen,employer_fen,individual_fen

- ``month``: YYYY-MM; ``employer``: the unit's 18-character unified social credit code;
  ``id_number``: the insured's citizen ID; ``insurance``: pension, medical, unemployment, work_injury or
  maternity; ``base_fen``: the contribution base; ``employer_fen`` / ``individual_fen``: the two parts paid
  (work injury and maternity have no individual part: it must be 0).

Parsing checks every row and collects every problem as (file, row, field, reason); the importer refuses
the whole file if there is any, so nothing is half-imported.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field

from citycard.core.identity import IdentityError, mask_id, validate_citizen_id, validate_unit_code

__all__ = ["INSURANCES", "ContributionImport", "ContributionRow", "ImportRefused", "parse_contributions"]

INSURANCES = ("pension", "medical", "unemployment", "work_injury", "maternity")
NO_INDIVIDUAL_PART = ("work_injury", "maternity")
COLUMNS = ("month", "employer", "id_number", "insurance", "base_fen", "employer_fen", "individual_fen")
ROWS_MAX = 100_000
FEN_MAX = 10**10
MONTH = re.compile(r"^(\d{4})-(\d{2})$")
DIGITS = re.compile(r"^\d{1,12}$")

Problem = tuple[str, int, str, str]  # file, row (1 = the header), field, reason


class ImportRefused(ValueError):
    """The file was not imported; ``problems`` lists every bad row."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        head = "; ".join(f"{f}:{row}: {name}: {why}" for f, row, name, why in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(f"nothing imported, {len(problems)} problem(s): {head}{more}")


@dataclass
class ContributionRow:
    line: int
    month: str
    employer: str
    id_number: str
    insurance: str
    base_fen: int
    employer_fen: int
    individual_fen: int
    credited_fen: int = 0


@dataclass
class ContributionImport:
    rows: list[ContributionRow] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)


def parse_contributions(text: str, *, source: str = "<input>") -> ContributionImport:
    out = ContributionImport()
    reader = csv.reader(io.StringIO(text.removeprefix("\ufeff")))
    header = next(reader, None)
    if header is None or sorted(c.strip() for c in header) != sorted(COLUMNS):
        out.errors.append((source, 1, "header", f"must name the columns {','.join(COLUMNS)}"))
        return out
    index = {name.strip(): position for position, name in enumerate(header)}
    seen: dict[tuple[str, str, str, str], int] = {}
    for line, cells in enumerate(reader, start=2):
        if line - 1 > ROWS_MAX:
            out.errors.append((source, line, "rows", f"more than {ROWS_MAX} rows in one file"))
            break
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) != len(COLUMNS):
            out.errors.append((source, line, "row", f"has {len(cells)} cells, expected {len(COLUMNS)}"))
            continue
        row = _row(source, line, {name: cells[position].strip() for name, position in index.items()}, out.errors)
        if row is None:
            continue
        key = (row.month, row.employer, row.id_number, row.insurance)
        if key in seen:
            why = f"repeats row {seen[key]} ({row.insurance}, {mask_id(row.id_number)}, {row.month})"
            out.errors.append((source, line, "id_number", why))
            continue
        seen[key] = line
        out.rows.append(row)
    return out


def _row(source: str, line: int, cell: dict[str, str], errors: list[Problem]) -> ContributionRow | None:
    problems: list[Problem] = []
    match = MONTH.match(cell["month"])
    if not match or not 1 <= int(match.group(2)) <= 12 or not 1990 <= int(match.group(1)) <= 2100:
        problems.append((source, line, "month", f"{cell['month']!r} is not a month written YYYY-MM"))
    try:
        employer = validate_unit_code(cell["employer"]).code
    except (IdentityError, TypeError, ValueError) as exc:
        problems.append((source, line, "employer", str(exc)))
        employer = ""
    try:
        id_number = validate_citizen_id(cell["id_number"]).number
    except (IdentityError, TypeError) as exc:
        problems.append((source, line, "id_number", str(exc)))
        id_number = ""
    if cell["insurance"] not in INSURANCES:
        problems.append((source, line, "insurance", f"{cell['insurance']!r} is not one of {', '.join(INSURANCES)}"))
    amounts = {}
    for name in ("base_fen", "employer_fen", "individual_fen"):
        if not DIGITS.match(cell[name]) or int(cell[name]) > FEN_MAX:
            problems.append((source, line, name, f"{cell[name]!r} is not a whole number of fen from 0 to {FEN_MAX}"))
        else:
            amounts[name] = int(cell[name])
    if cell["insurance"] in NO_INDIVIDUAL_PART and amounts.get("individual_fen"):
        problems.append((source, line, "individual_fen", f"{cell['insurance']} insurance has no individual part"))
    if problems:
        errors.extend(problems)
        return None
    return ContributionRow(line, cell["month"], employer, id_number, cell["insurance"], amounts["base_fen"],
                           amounts["employer_fen"], amounts["individual_fen"])
