"""A stand-in for the card producer's printing line, for the demo and the tests: it reads a print-data
export (the DBF and the photos folder) the way a producer's software would, "prints" the rows, and
writes the results file the producer sends back (card number, chip serial, card identification code,
ATR). A real producer replaces this module; nothing in production depends on it.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import dbf
from citycard.card import ATR

__all__ = ["print_batch"]

RESULT_FIELDS = "KH C(9); XPXLH C(32); SBM C(32); ATR C(66)"


def chip_serial(card_number: str) -> str:
    """A chip serial as a chip maker would burn it: 8 bytes, unique per card here."""
    return hashlib.sha256(f"chip:{card_number}".encode("ascii")).hexdigest()[:16].upper()


def print_batch(export_folder: Path, results: Path, *, fmt: str = "dbf") -> list[dict[str, str]]:
    """Print every row of the export whose photo is in the folder; write and return the results."""
    tables = sorted(Path(export_folder).glob("*.dbf"))
    if len(tables) != 1:
        raise ValueError(f"{export_folder}: expected one print-data table, found {len(tables)}")
    table = dbf.Table(str(tables[0]))
    table.open(dbf.READ_ONLY)
    try:
        lines = [{"KH": record.KH.strip(), "XPXLH": chip_serial(record.KH.strip()), "SBM": record.SBM.strip(),
                  "ATR": ATR.hex().upper()}
                 for record in table
                 if (Path(export_folder) / "photos" / record.ZPWJ.strip()).is_file()]
    finally:
        table.close()
    if fmt == "csv":
        with open(results, "w", encoding="utf-8", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=("KH", "XPXLH", "SBM", "ATR"))
            writer.writeheader()
            writer.writerows(lines)
    else:
        out_table = dbf.Table(str(results), RESULT_FIELDS, codepage="cp936", dbf_type="db3")
        out_table.open(dbf.READ_WRITE)
        try:
            for line in lines:
                out_table.append((line["KH"], line["XPXLH"], line["SBM"], line["ATR"]))
        finally:
            out_table.close()
    return lines
