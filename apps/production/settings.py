"""Production settings, from the ``"production"`` section of ``DIR/citycard.json``.

The section is optional and every setting has a default; an unknown name or a value of the wrong kind
is an error naming the file and the field (a typo must not fall back silently)::

    {"production": {
        "issuing_organisation": "济南市人力资源和社会保障局",
        "card_type": "3", "spec_version": "3.00",
        "init_org": "370100000000000000000001",
        "purse_issuer_id": "3701000000000001",
        "purse_balance_max_fen": 100000,
        "master_keys": "keys/issuer.json",
        "batch_rows_max": 4000,
        "photo": {"width": 358, "height": 441, "jpeg_quality": 90, "bytes_max": 61440}}}

- ``issuing_organisation``: printed on the card face and in the print-data file (FKJG).
- ``card_type``, ``spec_version``, ``init_org``: the card identity file EF05 of the chip.
- ``purse_issuer_id``: the e-purse issuer id in the purse's public data (8 bytes, hex).
- ``master_keys``: the issuer master key file that personalisation diversifies from, relative to DIR;
  when absent, ``$CITYCARD_CARD_KEYS`` (keys are configuration, never code). ``--keys`` overrides both.
- ``batch_rows_max``: rows in one production batch. A batch commits in one ledger batch that opens up
  to two accounts per row (a new person's medical account and the card's e-purse), so at most 4,094.
- ``photo``: the card producer's photo specification (pixels, JPEG quality, largest file).

The initial PIN of the social security application is not a setting here: it is the public, well-known
initial PIN of the city's cards (``INITIAL_PIN``), which the holder replaces at activation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from citycard.core.settings import SETTINGS_FILE, load_settings

from .errors import ProductionError

__all__ = ["INITIAL_PIN", "PhotoSpec", "ProductionSettings", "load_production_settings"]

SECTION = "production"
INITIAL_PIN = "123456"  # the cards' published initial PIN; activation replaces it
BATCH_ROWS_LIMIT = 4094  # (8,189 accounts per ledger batch) // (2 accounts per row)
SETTINGS_FILE_BYTES_MAX = 1024 * 1024


@dataclass(frozen=True)
class PhotoSpec:
    width: int = 358
    height: int = 441
    jpeg_quality: int = 90
    bytes_max: int = 60 * 1024

    @property
    def ratio(self) -> float:
        return self.width / self.height


@dataclass(frozen=True)
class ProductionSettings:
    issuing_organisation: str = "市人力资源和社会保障局"
    card_type: str = "3"
    spec_version: str = "3.00"
    init_org: str = ""  # default: derived from the issuer region (see for_region)
    purse_issuer_id: str = ""
    purse_balance_max_fen: int = 100_000
    master_keys: Path | None = None
    batch_rows_max: int = 4000
    photo: PhotoSpec = field(default_factory=PhotoSpec)
    issuer_region_code: str = "370100"  # from the registry settings, not from this section


def load_production_settings(data_dir: str | Path) -> ProductionSettings:
    """The production section of DIR/citycard.json over the defaults, checked."""
    data_dir = Path(data_dir)
    region = load_settings(data_dir).issuer_region_code
    path = data_dir / SETTINGS_FILE
    section: dict[str, Any] = {}
    if path.exists():
        try:
            if path.stat().st_size > SETTINGS_FILE_BYTES_MAX:
                raise ProductionError("file", f"is larger than {SETTINGS_FILE_BYTES_MAX} bytes", file=str(path))
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ProductionError("file", f"cannot be read as UTF-8 JSON ({exc})", file=str(path)) from None
        section = document.get(SECTION, {}) if isinstance(document, dict) else {}
        if not isinstance(section, dict):
            raise ProductionError(SECTION, "must be a JSON object", file=str(path))
    return _settings_from(section, str(path), data_dir, region)


def _settings_from(section: dict[str, Any], source: str, data_dir: Path, region: str) -> ProductionSettings:
    known = {item.name for item in fields(ProductionSettings)} - {"issuer_region_code"}
    for name in section:
        if name not in known:
            raise ProductionError(f"{SECTION}.{name}", f"is not a setting; known: {', '.join(sorted(known))}",
                                  file=source)
    values = dict(section)

    def need(condition: bool, name: str, reason: str) -> None:
        if not condition:
            raise ProductionError(f"{SECTION}.{name}", reason, file=source)

    def text(name: str, length_max: int) -> None:
        if name in values:
            value = values[name]
            need(isinstance(value, str) and 0 < len(value.strip()) <= length_max, name,
                 f"must be text of 1 to {length_max} characters")

    def hex_text(name: str, digits: int) -> None:
        if name in values:
            value = values[name]
            need(isinstance(value, str) and len(value) == digits and _is_hex(value), name,
                 f"must be {digits} hexadecimal digits")

    text("issuing_organisation", 30)
    if "issuing_organisation" in values:
        try:
            values["issuing_organisation"].encode("gbk")
        except UnicodeEncodeError:
            need(False, "issuing_organisation", "must be writable in GBK")
    text("card_type", 1)
    text("spec_version", 4)
    hex_text("init_org", 24)
    hex_text("purse_issuer_id", 16)
    if "purse_balance_max_fen" in values:
        value = values["purse_balance_max_fen"]
        need(_is_int(value) and 1 <= value <= 0x7FFFFFFF, "purse_balance_max_fen", "must be 1 to 2147483647 fen")
    if "batch_rows_max" in values:
        value = values["batch_rows_max"]
        need(_is_int(value) and 1 <= value <= BATCH_ROWS_LIMIT, "batch_rows_max",
             f"must be a whole number from 1 to {BATCH_ROWS_LIMIT}")
    if "master_keys" in values:
        value = values["master_keys"]
        need(isinstance(value, str) and bool(value), "master_keys", "must be a file path")
        values["master_keys"] = data_dir / value
    if "photo" in values:
        values["photo"] = _photo_spec(values["photo"], need)
    values.setdefault("init_org", f"{region}{'0' * 17}1")
    values.setdefault("purse_issuer_id", f"{region}{'0' * 9}1")
    return ProductionSettings(**values, issuer_region_code=region)


def _photo_spec(section: Any, need: Any) -> PhotoSpec:
    need(isinstance(section, dict), "photo", "must be a JSON object")
    known = {item.name for item in fields(PhotoSpec)}
    for name in section:
        need(name in known, f"photo.{name}", f"is not a setting; known: {', '.join(sorted(known))}")
    limits = {"width": (100, 2000), "height": (100, 2000), "jpeg_quality": (30, 100), "bytes_max": (4096, 10**7)}
    for name, (low, high) in limits.items():
        if name in section:
            need(_is_int(section[name]) and low <= section[name] <= high, f"photo.{name}",
                 f"must be a whole number from {low} to {high}")
    return PhotoSpec(**section)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_hex(text: str) -> bool:
    return all(char in "0123456789abcdefABCDEF" for char in text)
