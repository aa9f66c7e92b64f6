"""The built-in medical application: the only application the MEDICAL ledger is open to.

It registers its manifest (its funds, the designated institutions' settlement account and the clearing
account for partner cities' insured on MEDICAL; the institutions' e-purse account on PURSE),
and serves ``citycard.v1.Medical`` (real-time settlement at designated hospitals and pharmacies,
admissions, refunds, contribution imports, expense records, statements) from its own process, booking
every amount through the core's Ledger service with its own credential. See README.md.

Environment (beside the plugin contract's): ``CITYCARD_MEDICAL_DIR`` (its store, operator token and
``ready.json``, conventionally ``DATA/medical``; unset: the Medical service is not served, the plugin only
keeps its registration alive), ``CITYCARD_MEDICAL_LISTEN`` (default ``127.0.0.1:0``, any free port;
clients read the address from ``ready.json``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from citycard.apps.plugin import Plugin, Session
from citycard.core.records import AccountKind, LedgerId, TransferCode

from citycard.v1 import applications_pb2

__all__ = ["AID", "ENV_DIR", "ENV_LISTEN", "MedicalPlugin"]

AID = "D15600000503"  # MOHRSS RID D156000005, sub-application "social insurance 2" (medical insurance)
HEARTBEAT_S = 30.0
ENV_DIR = "CITYCARD_MEDICAL_DIR"
ENV_LISTEN = "CITYCARD_MEDICAL_LISTEN"
DEFAULT_LISTEN = "127.0.0.1:0"
log = logging.getLogger("citycard.apps.medical")


class MedicalPlugin(Plugin):
    name = "medical"

    def manifest(self) -> applications_pb2.Manifest:
        return applications_pb2.Manifest(
            # PURSE too, for the insured's share paid from the e-purse in the same linked chain as the
            # bill's MEDICAL transfers (each transfer stays on its own ledger).
            name=self.name, aid=AID, ledgers=[LedgerId.MEDICAL, LedgerId.PURSE],
            transfer_codes=[TransferCode.CONTRIBUTION, TransferCode.SETTLEMENT, TransferCode.POOLED_FUND_PAYMENT,
                            TransferCode.REFUND, TransferCode.PURCHASE],
            accounts=[
                applications_pb2.AccountSpec(name="individual_fund", ledger=LedgerId.MEDICAL, kind=AccountKind.FUND),
                applications_pb2.AccountSpec(name="pooled_fund", ledger=LedgerId.MEDICAL, kind=AccountKind.FUND),
                applications_pb2.AccountSpec(name="institutions", ledger=LedgerId.MEDICAL,
                                             kind=AccountKind.INSTITUTION_SETTLEMENT),
                applications_pb2.AccountSpec(name="institutions_purse", ledger=LedgerId.PURSE,
                                             kind=AccountKind.INSTITUTION_SETTLEMENT),
                # Pays institutions for partner cities' insured (out-of-city treatment); runs into debit:
                # its net debit is what the partner cities owe this city.
                applications_pb2.AccountSpec(name="clearing", ledger=LedgerId.MEDICAL, kind=AccountKind.FUND),
            ])

    def run(self, session: Session) -> None:
        from citycard.apps.medical.core_client import CoreClient
        from citycard.apps.medical.servicer import serve_medical

        directory = os.environ.get(ENV_DIR)
        running = None
        if directory:
            accounts = {account.name: account.id for account in session.application.accounts}
            core = CoreClient(session.channel, session.metadata, accounts)
            running = serve_medical(core, Path(directory), os.environ.get(ENV_LISTEN, DEFAULT_LISTEN))
        else:
            log.info("%s is not set: the Medical service is not served", ENV_DIR)
        try:
            while not session.wait(HEARTBEAT_S):
                session.applications.GetApplication(applications_pb2.GetApplicationRequest(name=self.name),
                                                    metadata=session.metadata, timeout=10)
        finally:
            if running is not None:
                running.stop()
