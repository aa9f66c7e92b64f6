"""The soft SAM and the issuer host: MAC1 the card accepts, MAC2 checked, TAC computed and verified from the
record fields alone (what the back office does with uploaded offline transactions), keys never shown."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from citycard.card import (
    CardChannel,
    IssuerHost,
    KeyFileError,
    KeyUsage,
    MasterKeys,
    MemoryStore,
    MemoryTransport,
    PurchaseTacFields,
    SamError,
    SamMacError,
    SoftSam,
    Terminal,
    VirtualCard,
    personalize,
    profile_from_json,
    verify_tac,
)
from citycard.card.personalize import SAMPLE_PROFILE
from citycard.card.sam import PurchaseRequest

from .helpers import PIN, TERMINAL_ID, TEST_KEYS_PATH

SERIAL = bytes.fromhex("33030000000000000001")


def test_tac_verification_from_record_fields(terminal: Terminal, master_keys: MasterKeys) -> None:
    terminal.verify_pin(PIN)
    terminal.load(2_000)
    receipt = terminal.purchase(345)
    fields = receipt.tac_fields()
    assert fields == PurchaseTacFields(SERIAL, 345, 0x06, TERMINAL_ID, receipt.terminal_seq, receipt.date_time)
    assert verify_tac(master_keys, fields, receipt.tac)
    for change in ({"amount_fen": 346}, {"terminal_seq": receipt.terminal_seq + 1}, {"tx_type": 0x09},
                   {"app_serial": bytes.fromhex("33030000000000000002")}, {"terminal_id": bytes(6)}):
        assert not verify_tac(master_keys, dataclasses.replace(fields, **change), receipt.tac), change
    assert not verify_tac(MasterKeys.generate(), fields, receipt.tac)
    assert not verify_tac(master_keys, fields, receipt.tac[:3])


def test_sam_numbers_transactions_and_checks_mac2(master_keys: MasterKeys) -> None:
    sam = SoftSam(master_keys, TERMINAL_ID, next_terminal_seq=41)
    request = PurchaseRequest(bytes(4), 0, 100, 0x06, bytes.fromhex("20250115120000"), 1, 0, SERIAL)
    first = sam.init_for_purchase(request)
    assert first.terminal_seq == 41 and len(first.mac1) == 4
    with pytest.raises(SamMacError):
        sam.check_mac2(bytes(4))
    with pytest.raises(SamError, match="no purchase session"):
        sam.check_mac2(bytes(4))  # the session went with the failed check
    assert sam.init_for_purchase(request).terminal_seq == 42


def test_one_sam_serves_many_cards_in_turn(master_keys: MasterKeys) -> None:
    """The SAM keeps each card's purchase key ready; interleaving cards must never mix them up."""
    sam = SoftSam(master_keys, TERMINAL_ID)
    terminals = []
    for n in (1, 2, 3):
        profile = dict(SAMPLE_PROFILE, purse=dict(SAMPLE_PROFILE["purse"], app_serial=f"{33030000000000000000 + n:020d}"))
        card = VirtualCard(personalize(profile_from_json(profile), master_keys), MemoryStore())
        terminals.append(Terminal(CardChannel(MemoryTransport(card)), sam, host=IssuerHost(master_keys)))
    for terminal in terminals:
        terminal.verify_pin(PIN)
        terminal.load(1_000)
    for _ in range(3):
        for n, terminal in enumerate(terminals, start=1):
            receipt = terminal.purchase(n)  # raises if MAC1 or MAC2 does not verify
            assert verify_tac(master_keys, receipt.tac_fields(), receipt.tac)
    assert [t.balance() for t in terminals] == [997, 994, 991]


def test_sam_refuses_unknown_key_version_and_non_purchases(master_keys: MasterKeys) -> None:
    sam = SoftSam(master_keys, TERMINAL_ID)
    base = PurchaseRequest(bytes(4), 0, 100, 0x06, bytes.fromhex("20250115120000"), 1, 0, SERIAL)
    with pytest.raises(SamError, match="version"):
        sam.init_for_purchase(base._replace(key_version=7))
    with pytest.raises(SamError, match="not a purchase"):
        sam.init_for_purchase(base._replace(tx_type=0x02))


def test_host_refuses_a_load_with_a_bad_mac1(master_keys: MasterKeys) -> None:
    host = IssuerHost(master_keys)
    with pytest.raises(SamMacError):
        host.authorize_load(SERIAL, balance_fen=0, online_counter=0, key_version=2, card_random=bytes(4),
                            mac1=bytes(4), amount_fen=100, tx_type=0x02, terminal_id=TERMINAL_ID,
                            date_time=bytes.fromhex("20250115120000"))


def test_keys_never_show(master_keys: MasterKeys) -> None:
    tac_master = master_keys.get("purse", KeyUsage.TAC)
    card_key = tac_master.for_card(KeyUsage.TAC, SERIAL[-8:])
    texts = [repr(master_keys), str(tac_master), repr(card_key), repr(SoftSam(master_keys, TERMINAL_ID)),
             repr(IssuerHost(master_keys)), f"{tac_master.value}", repr(card_key.value)]
    joined = " ".join(texts).lower()
    for application in ("purse", "ssse"):
        for entry in json.loads(TEST_KEYS_PATH.read_text())[application].values():
            assert entry["key"].lower() not in joined
    assert card_key.value.reveal().hex() not in joined
    assert str(tac_master.value) == "SecretKey(<redacted>)"
    with pytest.raises(TypeError):
        __import__("pickle").dumps(tac_master.value)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda o: o.update(format="x"), "format"),
        (lambda o: o.pop("ssse"), "'ssse' missing"),
        (lambda o: o["purse"].pop("tac"), "purse.tac: missing"),
        (lambda o: o["purse"]["load"].update(key="00" * 15), "purse.load: 'key' must be 16 bytes"),
        (lambda o: o["purse"]["load"].update(key="zz" * 16), "purse.load"),
        (lambda o: o["purse"]["load"].update(index=300), "purse.load"),
    ],
)
def test_bad_key_files_name_the_field_not_the_key(tmp_path: Path, mutate, message: str) -> None:
    obj = json.loads(TEST_KEYS_PATH.read_text())
    mutate(obj)
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(KeyFileError) as refused:
        MasterKeys.load(path)
    assert message in str(refused.value)
    assert "11223344556677888877665544332211" not in str(refused.value)


def test_key_file_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CITYCARD_CARD_KEYS", str(TEST_KEYS_PATH))
    assert MasterKeys.load().get("purse", "purchase").version == 1
    monkeypatch.delenv("CITYCARD_CARD_KEYS")
    with pytest.raises(KeyFileError, match="CITYCARD_CARD_KEYS"):
        MasterKeys.load()
    generated = MasterKeys.generate()
    generated.save(tmp_path / "k.json")
    assert (tmp_path / "k.json").stat().st_mode & 0o077 == 0
    assert MasterKeys.load(tmp_path / "k.json") == generated
