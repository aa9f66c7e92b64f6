"""An independent PC/SC client, pcsc-tools' `scriptor`, talks to the virtual card through the fixture's pcscd.

The same commands an operator types by hand (card/README.md): the answers must be the card's."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from citycard.card.personalize import SAMPLE_PROFILE
from citycard.card.purse import PURSE_AID
from citycard.card.ssse import SSSE_AID

pytestmark = pytest.mark.pcsc

SCRIPT = f"""\
# the e-purse: select, balance, public data (SFI 15)
00 A4 04 00 09 {PURSE_AID.hex(" ").upper()} 00
80 5C 00 02 04
00 B0 95 00 1E
# social security: SSSE, EF05 record 7 (card number), EF06 by tag 08 (SSN)
00 A4 04 00 0F {SSSE_AID.hex(" ").upper()} 00
00 A4 02 00 02 EF 05
00 B2 07 04 0B
00 A4 02 00 02 EF 06
00 B2 08 00 14
# a wrong PIN, an unknown instruction
00 20 00 00 03 99 99 99
00 12 00 00
"""


def parse_scriptor(output: str) -> list[tuple[str, str]]:
    """(command hex, response hex) pairs from scriptor's '> ...' / '< ... : text' lines."""
    pairs: list[tuple[str, str]] = []
    command, response, in_response = "", "", False
    for line in output.splitlines():
        if line.startswith("> "):
            command = line[2:].replace(" ", "")
        elif line.startswith("< ") or in_response:
            body = line.removeprefix("< ")
            in_response = " : " not in body
            response += body.split(" : ")[0].replace(" ", "")
            if not in_response:
                pairs.append((command, response))
                response = ""
    return pairs


def test_scriptor_gets_the_right_answers(insert_card, tmp_path: Path) -> None:
    scriptor = shutil.which("scriptor")
    assert scriptor is not None, "pcsc-tools is not installed (make system-deps installs it)"
    inserted = insert_card(0)
    script = tmp_path / "commands.txt"
    script.write_text(SCRIPT)
    run = subprocess.run([scriptor, "-r", inserted.reader.name, str(script)], check=False, capture_output=True,
                         text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    answers = [response for _, response in parse_scriptor(run.stdout)]
    assert len(answers) == 10, run.stdout
    serial = SAMPLE_PROFILE["purse"]["app_serial"].upper()
    select_purse, balance, public, select_ssse, sel05, card_number, sel06, ssn, bad_pin, bad_ins = answers
    assert select_purse.startswith("6F3284") and serial in select_purse and select_purse.endswith("9000")
    assert balance == "000000009000"
    assert public[20:40] == serial and public.endswith("9000")
    assert select_ssse.endswith("9000") and sel05 == "9000" and sel06 == "9000"
    assert card_number == "0709" + SAMPLE_PROFILE["ssse"]["card_number"].encode().hex().upper() + "9000"
    assert ssn == "0812" + SAMPLE_PROFILE["holder"]["ssn"].encode().hex().upper() + "9000"
    assert bad_pin == "63C2"
    assert bad_ins == "6D00"
    assert inserted.card.image.pin.tries_left == 2  # scriptor really reached this card
