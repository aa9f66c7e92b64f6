"""A virtual card for a registered person, for the counter-flow tests, the demo and the benchmark.

In production the card comes out of the production pipeline (apps/production); here a card with the
person's card number and citizen ID on it is personalised directly, with a throw-away issuer's keys.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from citycard.card import (
    SAMPLE_PROFILE,
    CardProfile,
    FileStore,
    MasterKeys,
    PcscDaemon,
    PcscTransport,
    VirtualCard,
    VpcdLink,
    personalize,
    profile_from_json,
)
from citycard.card.vpcd import VPCD_DEFAULT_PORT

__all__ = ["card_in_pcsc_reader", "card_profile_for"]


def card_profile_for(*, card_number: str, card_id_code: str, id_number: str, name: str, pin: str,
                     app_serial: str = "33030000000000000001") -> CardProfile:
    profile = copy.deepcopy(SAMPLE_PROFILE)
    birth = id_number[6:14]
    profile["ssse"].update(card_number=card_number, card_id_code=card_id_code or profile["ssse"]["card_id_code"])
    profile["holder"].update(ssn=id_number, name=name, gender="1" if int(id_number[16]) % 2 else "2",
                             birthplace=id_number[:6], birth_date=f"{birth[:4]}-{birth[4:6]}-{birth[6:]}")
    profile["purse"]["app_serial"] = app_serial
    profile["initial_pin"] = pin
    return profile_from_json(profile)


PCSCD_START_ATTEMPTS = 90  # x PCSCD_RETRY_S: up to 3 minutes for another pcscd to stop
PCSCD_RETRY_S = 2.0


@contextlib.contextmanager
def card_in_pcsc_reader(profile: CardProfile, keys: MasterKeys, workdir: Path,
                        out: Callable[[str], None] = lambda _: None) -> Iterator[PcscTransport]:
    """Personalise ``profile``, insert the card into a vpcd reader of a pcscd and yield a pyscard
    transport to it; remove the card and stop the pcscd we started on the way out.

    One pcscd runs per machine: while another is running (another test run's), we wait for it to stop and
    start our own; if it is still there after the budget (the system's), we use it through the default
    vpcd port, as the card demo does. A pcscd that cannot start is retried."""
    from citycard.card.pcscd import (
        PcscdError,
        present_readers,
        running_pcscd_pid,
        wait_for_card,
        wait_until_empty,
    )

    workdir.mkdir(parents=True, exist_ok=True)
    daemon = None
    port, reader_name = VPCD_DEFAULT_PORT, ""
    for attempt in range(PCSCD_START_ATTEMPTS):
        if running_pcscd_pid() is not None:
            # Another pcscd (another test run's private one, or the system's): wait for it to go; at the
            # end of the budget use it, as the card demo does with the system's (default vpcd port).
            if attempt == PCSCD_START_ATTEMPTS - 1:
                out(f"using the running pcscd; the card goes to the vpcd slot on port {port}")
                break
            if attempt == 0:
                out("another pcscd is running (one per machine); waiting for it to stop")
            time.sleep(PCSCD_RETRY_S)
            continue
        try:
            daemon = PcscDaemon(workdir / f"pcscd{attempt}", entries=1, name="citycard medical")
            reader = daemon.start()[0]
            port, reader_name = reader.port, reader.name
            out(f"started pcscd (pid {daemon.pid}) with reader {reader_name!r}")
            break
        except PcscdError as exc:
            daemon = None
            out(f"pcscd could not start ({exc}); retrying")
            time.sleep(PCSCD_RETRY_S)
    state_path = workdir / "card.json"
    FileStore(state_path).create(personalize(profile, keys))
    before = present_readers() if not reader_name else set()
    link = VpcdLink(VirtualCard.open(state_path), port)
    transport = None
    try:
        link.insert()
        if reader_name:
            wait_for_card(reader_name)
        else:
            deadline = time.monotonic() + 10
            while not (present_readers() - before):
                if time.monotonic() > deadline:
                    raise TimeoutError("the virtual card did not show up in any reader")
                time.sleep(0.05)
            reader_name = min(present_readers() - before)
        out(f"card {profile.identity.card_number} inserted in reader {reader_name!r}")
        transport = PcscTransport(reader_name)
        yield transport
    finally:
        if transport is not None:
            transport.close()
        link.remove()
        if daemon is None and reader_name:
            wait_until_empty(reader_name)
        if daemon is not None:
            daemon.stop()
            out("pcscd stopped")
