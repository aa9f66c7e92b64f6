"""The registry's row encoder: orjson where it writes the stdlib's bytes, the stdlib elsewhere, and so
the same bytes (and the same errors) as ``json.dumps(sort_keys=True, ensure_ascii=False, separators=(",", ":"))``
for every record."""

import datetime as dt
import enum
import json
import math

import pytest
from citycard.core import denylist
from citycard.core.lifecycle import CardState
from citycard.core.registry_store import REGISTRY_TABLES, encode

AT = (2025, 9, 1, 9, 0)
CODE_POINTS_PER_TEXT = 4096


def stdlib(record):
    return json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def test_every_stored_record_of_a_card_s_life_is_the_stdlib_s_bytes(kit):
    """Persons (a Chinese name), employers, cards with a nested loss report, history rows, the
    denylist, the audit head and the audit entries' details, as a counter's work leaves them."""
    registry = kit.open()
    holder, agent = kit.citizen_id(), kit.citizen_id(sequence=125)
    kit.add_person(registry, holder, name="欧阳娜娜", at=kit.at(*AT))
    kit.add_person(registry, agent, name="李四", at=kit.at(*AT))
    card = registry.issue_card(holder, actor="op", at=kit.at(*AT))
    registry.report_loss_phone(id_number=holder, name="欧阳娜娜", gender="male", employer=kit.UNIT, actor="op",
                               at=kit.at(2025, 9, 2, 9, 0))
    frozen = registry.report_loss_written(card.card_number, holder_id=holder, holder_name="欧阳娜娜",
                                          agent_id=agent, agent_name="李四", actor="op",
                                          at=kit.at(2025, 9, 2, 10, 0)).card
    assert frozen.state is CardState.FROZEN and frozen.loss_report.previous is not None
    checked = 0
    for table in REGISTRY_TABLES + denylist.DENYLIST_TABLES:
        for _, value in registry.ledger.scan(table):
            try:
                record = json.loads(value)
            except ValueError:
                continue  # not JSON: keys lists, sequence numbers
            if not isinstance(record, dict):
                continue
            assert encode(record) == stdlib(record), table
            if table != "audit":  # the audit log writes its entries itself (core/audit.py)
                assert encode(record) == value, table
            for part in record.values():  # audit details, loss reports: the nested objects alone too
                if isinstance(part, dict):
                    assert encode(part) == stdlib(part), table
            checked += 1
    assert checked >= 20
    stored_card = json.loads(registry.ledger.get("cards", card.card_number.encode()))
    assert stored_card["loss_report"]["previous"]["channel"] == "phone"
    assert "欧阳娜娜".encode() in registry.ledger.get("persons", holder.encode())


def test_every_code_point_is_written_as_the_stdlib_writes_it():
    points = [point for point in range(0x110000) if not 0xD800 <= point <= 0xDFFF]
    for start in range(0, len(points), CODE_POINTS_PER_TEXT):
        text = "".join(map(chr, points[start:start + CODE_POINTS_PER_TEXT]))
        record = {"text": text, text[:8]: [text[-8:]]}
        assert encode(record) == stdlib(record), f"code points from U+{points[start]:04X}"


class Colour(enum.StrEnum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class Bits(enum.IntFlag):
    ONE = 1
    TWO = 2


@pytest.mark.parametrize("record", [
    {"enums": [Colour.RED, Level.HIGH, Bits.ONE | Bits.TWO], "flag": True, "none": None, "tuple": (1, "二")},
    {"u64_max": 2**64 - 1, "i64_min": -2**63, "beyond": 2**64, "below": -2**63 - 1, "u128": 2**127},
    {"floats": [0.1, 1e16, 1e-5, 2.0, -0.0, math.inf, math.nan]},
    {"nested": {"z": {"b": [{"y": 1.5}]}, "a": []}},
    {1: "an integer key", 2: "another"},
    {"control": "\x00\x1f\x7f\u2028\u2029\"\\/\n\r\t\b\f", "键": "值", "emoji": "\U0001f600"},
], ids=["enums", "wide-integers", "floats", "nested-float", "integer-key", "escapes"])
def test_records_orjson_cannot_or_would_write_differently_get_the_stdlib_s_bytes(record):
    assert encode(record) == stdlib(record)


@pytest.mark.parametrize("record, error", [
    ({"lone_surrogate": "\ud800"}, UnicodeEncodeError),
    ({"when": dt.date(2025, 9, 1)}, TypeError),
    ({"instant": dt.datetime(2025, 9, 1, 9, 0)}, TypeError),
    ({"mixed_keys": {1: "a", "b": "c"}}, TypeError),
], ids=["lone-surrogate", "date", "datetime", "mixed-keys"])
def test_what_the_stdlib_refuses_is_refused_with_the_same_error(record, error):
    with pytest.raises(error):
        stdlib(record)
    with pytest.raises(error):
        encode(record)


def test_a_circular_record_is_refused_as_the_stdlib_refuses_it():
    record: dict = {"a": 1}
    record["self"] = record
    with pytest.raises(ValueError, match="Circular reference"):
        encode(record)
