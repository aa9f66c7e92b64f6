"""ISO 7816-4 on the chip: SELECT in its forms, READ/UPDATE BINARY and RECORD (by number, by tag, by SFI),
access conditions, Le handling, and the status words of bad commands."""

from __future__ import annotations

import pytest
from citycard.card import MasterKeys, MemoryStore, VirtualCard, personalize, profile_from_json
from citycard.card.personalize import SAMPLE_PROFILE
from citycard.card.purse import PUBLIC_DATA_SFI, PURSE_AID
from citycard.card.ssse import SSSE_AID

from .helpers import PIN, send

SELECT_SSSE = "00A404000F" + SSSE_AID.hex()
SELECT_PURSE = "00A4040009" + PURSE_AID.hex()


def test_select_by_name_returns_fci(card: VirtualCard) -> None:
    answer = send(card, SELECT_PURSE + "00")
    assert answer.startswith("6F328409" + PURSE_AID.hex().upper() + "A5259F0801019F0C1E")
    assert answer.endswith("9000")


def test_select_with_p2_0c_returns_no_data(card: VirtualCard) -> None:
    assert send(card, "00A4040C09" + PURSE_AID.hex()) == "9000"


def test_select_by_fid_mf_child_parent_and_path(card: VirtualCard) -> None:
    assert send(card, "00A40000021001").endswith("9000")  # ADF 1001 under the MF
    assert send(card, "00A40000020015") == "9000"  # EF 0015 in it
    assert send(card, "00A4030000").endswith("9000")  # back to the parent (the MF)
    assert send(card, "00A408000410010018") == "9000"  # path from the MF to EF 0018
    assert send(card, "00A40000023F00").endswith("9000")
    assert send(card, "00A4000000").endswith("9000")  # no data: the MF


@pytest.mark.parametrize(
    ("apdu", "sw"),
    [
        ("00A4040009A00000000386980799", "6A82"),  # unknown AID
        ("00A40000021234", "6A82"),  # unknown FID
        ("00A4020002EF05", "6A82"),  # EF05 is not under the MF
        ("00A404000F" + SSSE_AID.hex() + "00", "9000"),  # control: it is under SSSE
        ("00A40000031001FF", "6700"),  # FID of 3 bytes
        ("00A4050000", "6A86"),  # P1 05 does not exist
        ("00A4040400", "6A86"),  # P2 04 (FCP) not offered
        ("00A4040000", "6700"),  # Lc 00: case 2 with no name
    ],
)
def test_select_errors(card: VirtualCard, apdu: str, sw: str) -> None:
    assert send(card, apdu)[-4:] == sw


def test_failed_select_keeps_the_selection(card: VirtualCard) -> None:
    send(card, SELECT_PURSE)
    assert send(card, "00A40000021234") == "6A82"
    assert send(card, "805C000204") == "000000009000"  # still in the purse


def test_read_record_by_number_and_by_tag_agree(card: VirtualCard) -> None:
    send(card, SELECT_SSSE)
    assert send(card, "00A4020002EF06") == "9000"
    by_number = send(card, "00B2010414")  # EF06 record 1, current EF, P2 = 04
    by_tag = send(card, "00B2080014")  # EF06 tag 08, current EF, P2 = 00
    by_sfi = send(card, "00B2013414")  # record 1 of SFI 06
    assert by_number == by_tag == by_sfi
    assert by_number.startswith("0812" + b"330302198503070011".hex().upper())


def test_read_record_le_handling(card: VirtualCard) -> None:
    send(card, SELECT_SSSE)
    send(card, "00A4020002EF05")
    assert send(card, "00B207040B").endswith("9000")  # exact: 9 + 2 bytes
    assert send(card, "00B2070400").endswith("9000")  # Le 00: whatever there is
    assert send(card, "00B2070405") == "6C0B"  # too short: told the right Le
    assert send(card, "00B2070420").endswith("6282")  # longer: data with the end-of-record warning
    assert send(card, "00B2070420")[:-4] == send(card, "00B207040B")[:-4]


@pytest.mark.parametrize(
    ("apdu", "sw"),
    [
        ("00B2080400", "6A83"),  # record 8 does not exist in EF05
        ("00B2200000", "6A83"),  # no record with tag 20
        ("00B2000400", "6A86"),  # record 0
        ("00B2010500", "6A86"),  # mode 101 unsupported
        ("00B201FC00", "6A86"),  # SFI 31 is reserved
        ("00B2014C00", "6A82"),  # SFI 09 not in this DF
        ("00B0000000", "6981"),  # READ BINARY on a record file
    ],
)
def test_record_errors(card: VirtualCard, apdu: str, sw: str) -> None:
    send(card, SELECT_SSSE)
    send(card, "00A4020002EF05")
    assert send(card, apdu) == sw


def test_record_command_without_current_ef(card: VirtualCard) -> None:
    send(card, SELECT_SSSE)
    assert send(card, "00B2010400") == "6986"


def test_read_binary_by_sfi_and_offset(card: VirtualCard) -> None:
    send(card, SELECT_PURSE)
    full = send(card, "00B095001E")
    assert len(full) == 2 * 30 + 4 and full.endswith("9000")
    assert send(card, "00B0950A0A") == full[20:40] + "9000"  # serial number: bytes 10..19
    assert send(card, "00B0000A0A") == full[20:40] + "9000"  # same file, now current, by offset
    assert send(card, "00B0951C10").endswith("6282")  # 2 bytes left, 16 asked
    assert send(card, "00B0951E01") == "6B00"  # offset at the end
    assert send(card, "00B0B50000") == "6A86"  # P1 bits 7-6 must be 00 with an SFI


def test_pin_protected_file_needs_verify(card: VirtualCard) -> None:
    send(card, SELECT_PURSE)
    assert send(card, "00B0960000") == "6982"
    assert send(card, "0020000003" + PIN) == "9000"
    assert send(card, "00B0960000").endswith("9000")


def test_updates_need_external_authentication(card: VirtualCard) -> None:
    send(card, SELECT_SSSE)
    record = "0709" + b"B00000002".hex()
    assert send(card, "00DC072C0B" + record) == "6982"  # EF05 record 7 via SFI 05
    assert send(card, "00D6950001FF").endswith("6A82")  # no SFI 15 in SSSE


def test_update_binary_bounds(card: VirtualCard, master_keys) -> None:
    from citycard.card.sam import IssuerHost

    send(card, SELECT_PURSE)
    challenge = bytes.fromhex(send(card, "0084000008")[:-4])
    serial = bytes.fromhex(send(card, "00B0950A0A")[:-4])
    # the challenge is consumed by the READ BINARY in between
    cryptogram = IssuerHost(master_keys).external_auth_cryptogram("purse", serial, challenge)
    assert send(card, "0082000108" + cryptogram.hex()) == "6984"
    challenge = bytes.fromhex(send(card, "0084000008")[:-4])
    cryptogram = IssuerHost(master_keys).external_auth_cryptogram("purse", serial, challenge)
    assert send(card, "0082000108" + cryptogram.hex()) == "9000"
    assert send(card, "00D6951D02ABCD") == "6A84"  # would run past the 30-byte file
    assert send(card, "00D6951E01AB") == "6B00"
    assert send(card, "00D6951C02ABCD") == "9000"
    assert send(card, "00B0951C02") == "ABCD9000"
    assert send(card, "00D6960001AB") == "9000"  # AUTH also opens the cardholder file for update
    assert send(card, "00D6971C02ABCD") == "6981"  # SFI 17 is a record file


def test_update_and_append_records(card: VirtualCard, master_keys) -> None:
    from citycard.card.sam import IssuerHost

    send(card, SELECT_SSSE)
    send(card, "00A4020002EF05")
    card_id_code = bytes.fromhex(send(card, "00B2010412")[4:-4])
    challenge = bytes.fromhex(send(card, "0084000004")[:-4])
    cryptogram = IssuerHost(master_keys).external_auth_cryptogram("ssse", card_id_code, challenge)
    assert send(card, "0082000108" + cryptogram.hex()) == "9000"
    new_number = "0709" + b"B00000002".hex().upper()
    assert send(card, "00DC07040B" + new_number) == "9000"  # by number, current EF
    assert send(card, "00B2070400") == new_number + "9000"
    assert send(card, "00DC07000B" + "0509" + b"B00000003".hex()) == "6A80"  # found by tag 07, would become tag 05
    assert send(card, "00DC07040A" + "0709" + "00" * 8) == "6A80"  # TLV length says 9, value has 8
    assert send(card, "00E2000003070141") == "6A84"  # EF05 is full (7 of 7 records)
    # leaving the DF drops the authentication
    send(card, "00A40000023F00")
    send(card, SELECT_SSSE)
    send(card, "00A4020002EF05")
    assert send(card, "00DC07040B" + new_number) == "6982"


@pytest.mark.parametrize(
    ("apdu", "sw"),
    [
        ("01A4000000", "6E00"),  # logical channel 1
        ("84A4000000", "6E00"),  # secure messaging class
        ("FFA4000000", "6E00"),
        ("0012000000", "6D00"),  # unknown INS
        ("805C000204", "6D00"),  # purse command outside the purse ADF
        ("00A4", "6700"),  # truncated
        ("00A40400050102", "6700"),  # Lc larger than the data
    ],
)
def test_class_and_instruction_errors(card: VirtualCard, apdu: str, sw: str) -> None:
    assert send(card, apdu) == sw


def test_select_shows_the_public_data_as_it_is_now(master_keys: MasterKeys) -> None:
    """The card keeps the purse's FCI between SELECTs; a change of 0015 must show in the next one."""
    card = VirtualCard(personalize(profile_from_json(SAMPLE_PROFILE), master_keys), MemoryStore())
    select = "00A4040009" + PURSE_AID.hex() + "00"
    first = send(card, select)
    assert send(card, select) == first
    purse_df = next(df for df in card.image.mf.walk() if df.application == "purse")
    public = purse_df.ef_by_sfi(PUBLIC_DATA_SFI)
    public.data[-1] ^= 0xFF  # what an UPDATE BINARY of the last byte would leave
    changed = send(card, select)
    assert changed != first and changed[:-4].endswith(f"{public.data[-1]:02X}")
