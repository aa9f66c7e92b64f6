"""Reading the e-government roster export: CSV or DBF, GBK or UTF-8, one canonical row at a time.

The export's columns are recognised by any of their usual names (the DBF field names are the pinyin
abbreviations of the Chinese headers)::

    id_number               SFZHM, SFZH, GMSFHM, 身份证号码, 身份证号, 公民身份号码
    name                    XM, 姓名
    gender                  XB, 性别                 1 / 2 (GB/T 2261.1), 男 / 女, male / female
    date_of_birth           CSRQ, 出生日期           DBF date, YYYY-MM-DD, YYYYMMDD or YYYY/MM/DD
    ethnicity               MZ, 民族                 GB/T 3304 code, 01 to 56, 97, 98
    nationality (optional)  GJ, 国籍                 ISO 3166 alpha-3; empty or absent: CHN
    employer                DWBH, TYSHXYDM, 单位编号, 统一社会信用代码
    residence               JZD, XJZD, 居住地, 现居住地
    household_registration  HJD, HJSZD, 户籍地, 户籍所在地

Other columns are ignored (and named in the result). Row N is the N-th record after the header (CSV)
or the N-th record of the table (DBF; deleted records keep their numbers and are skipped).

Encodings: a CSV is read as UTF-8 (a BOM is allowed) if every byte of it decodes so, else as GBK
(decoded as GB 18030, its superset, so that a character outside GBK is reported on its row by the
name check rather than failing the whole file). A DBF says its code page in its header (0x4D or 0x7A:
GBK); a DBF that says none is read as GBK, the encoding of Chinese DBF files. ``encoding`` forces one.
"""

from __future__ import annotations

import codecs
import csv
import datetime as _dt
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dbf

from .errors import ProductionError, RowProblem

__all__ = ["COLUMNS", "REQUIRED_COLUMNS", "Piece", "RawRow", "RecordRange", "RosterFile", "detect_text_encoding"]

COLUMNS: dict[str, tuple[str, ...]] = {
    "id_number": ("SFZHM", "SFZH", "GMSFHM", "身份证号码", "身份证号", "公民身份号码", "ID_NUMBER"),
    "name": ("XM", "姓名", "NAME"),
    "gender": ("XB", "性别", "GENDER"),
    "date_of_birth": ("CSRQ", "出生日期", "DATE_OF_BIRTH"),
    "ethnicity": ("MZ", "民族", "ETHNICITY"),
    "nationality": ("GJ", "国籍", "NATIONALITY"),
    "employer": ("DWBH", "TYSHXYDM", "单位编号", "统一社会信用代码", "EMPLOYER"),
    "residence": ("JZD", "XJZD", "居住地", "现居住地", "RESIDENCE"),
    "household_registration": ("HJD", "HJSZD", "户籍地", "户籍所在地", "HOUSEHOLD_REGISTRATION"),
}
REQUIRED_COLUMNS = ("id_number", "name", "gender", "date_of_birth", "ethnicity", "employer", "residence",
                    "household_registration")
ROWS_MAX = 2_000_000  # a city's whole insured population in one file is a mistake, not a roster
FIELD_CHARS_MAX = 200
DETECT_CHUNK_BYTES = 1 << 20
_DBF_GBK = "cp936"
_ENCODINGS = {"utf-8": "utf-8", "utf8": "utf-8", "gbk": "gbk", "cp936": "gbk", "gb18030": "gbk", "gb2312": "gbk"}


@dataclass(frozen=True)
class RawRow:
    """A record as read: canonical column -> text (stripped), a date (DBF date field) or None."""

    number: int
    values: dict[str, Any]
    problem: RowProblem | None = None  # the record could not be read at all (bytes, field count)


@dataclass(frozen=True)
class RecordRange:
    """DBF records ``start`` to ``stop`` (0-based, stop excluded): a piece that its reader reads."""

    start: int
    stop: int


Piece = RecordRange | list[RawRow]


@dataclass
class RosterFile:
    """One roster file (or any exchange file with known columns), opened for reading rows. ``columns``
    maps canonical names to the file's headers; ``known`` and ``required`` say which to look for."""

    path: Path
    display_name: str
    known: dict[str, tuple[str, ...]] = field(default_factory=lambda: COLUMNS)
    required: tuple[str, ...] = REQUIRED_COLUMNS
    format: str = ""
    encoding: str = ""
    columns: dict[str, str] = field(default_factory=dict)
    ignored_columns: list[str] = field(default_factory=list)
    deleted_records: int = 0

    @classmethod
    def open(cls, path: Path, *, display_name: str, encoding: str = "auto",
             known: dict[str, tuple[str, ...]] | None = None, required: tuple[str, ...] | None = None) -> RosterFile:
        roster = cls(path=path, display_name=display_name, known=known or COLUMNS,
                     required=required if required is not None else REQUIRED_COLUMNS)
        suffix = path.suffix.lower()
        if suffix == ".dbf":
            roster.format = "dbf"
        elif suffix in (".csv", ".txt"):
            roster.format = "csv"
        else:
            raise ProductionError("file", "is neither a .csv nor a .dbf file", file=display_name)
        roster.encoding = roster._choose_encoding(encoding)
        headers = roster._headers()
        roster._map_columns(headers)
        return roster

    def error(self, field_name: str, reason: str, row: int | None = None) -> ProductionError:
        return ProductionError(field_name, reason, file=self.display_name, row=row)

    # -- encoding and header ---------------------------------------------------------------------------

    def _choose_encoding(self, requested: str) -> str:
        if requested != "auto":
            chosen = _ENCODINGS.get(requested.lower())
            if chosen is None:
                raise self.error("encoding", f"{requested!r} is not one of auto, utf-8, gbk")
            return chosen
        if self.format == "dbf":
            declared = self._dbf_codepage()
            if declared.name not in ("cp936", "ascii"):
                raise self.error("encoding", f"the table declares code page {declared.name} ({declared.desc}); "
                                             "a roster is GBK or UTF-8: pass --encoding if the declaration is wrong")
            return "gbk"
        return detect_text_encoding(self.path, self.display_name)

    def _dbf_codepage(self) -> Any:
        table = self._open_dbf(None)
        try:
            return table.codepage
        finally:
            table.close()

    def _open_dbf(self, codepage: str | None) -> Any:
        try:
            table = dbf.Table(str(self.path), codepage=codepage) if codepage else dbf.Table(str(self.path))
            table.open(dbf.READ_ONLY)
        except (dbf.DbfError, OSError, ValueError, IndexError, KeyError) as exc:
            raise self.error("file", f"is not a readable DBF table ({type(exc).__name__}: {exc})") from None
        return table

    def _dbf_table(self) -> Any:
        codepage = {"gbk": _DBF_GBK, "utf-8": "utf8"}.get(self.encoding)
        return self._open_dbf(codepage)

    def _headers(self) -> list[str]:
        if self.format == "dbf":
            table = self._dbf_table()
            try:
                return [str(name).upper() for name in table.field_names]
            finally:
                table.close()
        with self._text() as text:
            try:
                header = next(csv.reader(text), None)
            except (csv.Error, UnicodeDecodeError) as exc:
                raise self.error("header", f"cannot be read ({exc})") from None
        if header is None:
            raise self.error("header", "the file is empty")
        return [cell.strip().lstrip("\ufeff") for cell in header]

    def _map_columns(self, headers: list[str]) -> None:
        header_of = {alias.upper(): canonical for canonical, aliases in self.known.items() for alias in aliases}
        for header in headers:
            canonical = header_of.get(header.upper())
            if canonical is None:
                self.ignored_columns.append(header)
                continue
            if canonical in self.columns:
                raise self.error(canonical, f"two columns mean it: {self.columns[canonical]!r} and {header!r}")
            self.columns[canonical] = header
        for canonical in self.required:
            if canonical not in self.columns:
                raise self.error(canonical, "the column is missing; it may be headed "
                                            + " or ".join(repr(alias) for alias in self.known[canonical][:4]))

    def _text(self) -> io.TextIOWrapper:
        codec = "utf-8-sig" if self.encoding == "utf-8" else "gb18030"
        return open(self.path, encoding=codec, newline="")

    # -- rows ------------------------------------------------------------------------------------------

    def rows(self) -> Iterator[RawRow]:
        yield from (self._dbf_rows(0, None) if self.format == "dbf" else self._csv_rows())

    def pieces(self, rows_per_piece: int) -> Iterator[Piece]:
        """The file in pieces of about ``rows_per_piece`` records that can be read and checked apart, in
        file order: record ranges of a DBF table (whoever checks a range reads it, which is most of the
        work), lists of rows of a CSV (read here: the csv module is quick, and a CSV cannot be split
        without reading it)."""
        if self.format == "dbf":
            records = self._dbf_record_count()
            for start in range(0, records, rows_per_piece):
                yield RecordRange(start, min(records, start + rows_per_piece))
            return
        piece: list[RawRow] = []
        for raw in self._csv_rows():
            piece.append(raw)
            if len(piece) == rows_per_piece:
                yield piece
                piece = []
        if piece:
            yield piece

    def rows_of(self, piece: Piece) -> Iterator[RawRow]:
        """The rows of a piece that ``pieces`` gave; a DBF range counts its deleted records."""
        if isinstance(piece, RecordRange):
            yield from self._dbf_rows(piece.start, piece.stop)
        else:
            yield from piece

    def _csv_rows(self) -> Iterator[RawRow]:
        with self._text() as text:
            reader = csv.reader(text)
            header = [cell.strip().lstrip("\ufeff") for cell in next(reader)]
            positions = {canonical: header.index(name) for canonical, name in self.columns.items()}
            number = 0
            while True:
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    raise self.error("file", f"is not well-formed CSV ({exc})", row=number + 1) from None
                number += 1
                self._check_count(number)
                if not any(cell.strip() for cell in cells):
                    continue  # a blank line is not a record
                if len(cells) != len(header):
                    yield RawRow(number, {}, RowProblem(self.display_name, number, "row",
                                                        f"has {len(cells)} fields, the header has {len(header)}"))
                    continue
                yield RawRow(number, {canonical: cells[position].strip()
                                      for canonical, position in positions.items()})

    def _dbf_record_count(self) -> int:
        table = self._dbf_table()
        try:
            records = len(table)
        finally:
            table.close()
        self._check_count(records)
        return records

    def _dbf_rows(self, start: int, stop: int | None) -> Iterator[RawRow]:
        """Records ``start`` to ``stop`` (all when None) of the table; record i is row i + 1."""
        table = self._dbf_table()
        try:
            stop = len(table) if stop is None else stop
            self._check_count(stop)
            names = {canonical: str(name).upper() for canonical, name in self.columns.items()}
            index_of = {str(name).upper(): i for i, name in enumerate(table.field_names)}
            positions = {canonical: index_of[name] for canonical, name in names.items()}
            for index in range(start, stop):
                number = index + 1
                record = table[index]
                if dbf.is_deleted(record):
                    self.deleted_records += 1
                    continue
                try:
                    cells = tuple(record)
                except UnicodeDecodeError as exc:
                    yield RawRow(number, {}, RowProblem(self.display_name, number, "encoding",
                                                        f"bytes {exc.start}-{exc.end} of a field are not "
                                                        f"{self.encoding.upper()}"))
                    continue
                except (dbf.DbfError, ValueError) as exc:
                    yield RawRow(number, {}, RowProblem(self.display_name, number, "row",
                                                        f"cannot be read ({exc})"))
                    continue
                yield RawRow(number, {canonical: _dbf_value(cells[position])
                                      for canonical, position in positions.items()})
        finally:
            table.close()

    def _check_count(self, number: int) -> None:
        if number > ROWS_MAX:
            raise self.error("file", f"has more than {ROWS_MAX} records; split it")


def _dbf_value(value: Any) -> Any:
    if value is None or isinstance(value, _dt.date):
        return value
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)):
        return str(int(value)) if float(value).is_integer() else str(value)
    return str(value).strip()


def detect_text_encoding(path: Path, display_name: str) -> str:
    """utf-8 if the whole file decodes as UTF-8, else gbk if it decodes as GB 18030; else an error naming
    the first byte that fits neither."""
    first_bad: int | None = None
    for name, codec in (("utf-8", "utf-8"), ("gbk", "gb18030")):
        decoder = codecs.getincrementaldecoder(codec)()
        offset = 0
        try:
            with open(path, "rb") as raw:
                while chunk := raw.read(DETECT_CHUNK_BYTES):
                    decoder.decode(chunk)
                    offset += len(chunk)
                decoder.decode(b"", final=True)
            return name
        except UnicodeDecodeError as exc:
            first_bad = offset + exc.start if first_bad is None else first_bad
        except OSError as exc:
            raise ProductionError("file", f"cannot be read ({exc.strerror})", file=display_name) from None
    raise ProductionError("encoding", f"is neither UTF-8 nor GBK (byte {first_bad} fits neither); "
                                      "pass --encoding to say which", file=display_name)
