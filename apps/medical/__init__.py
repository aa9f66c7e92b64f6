"""The built-in medical application: the only application the MEDICAL ledger is open to.

For now it registers its manifest (its funds and the designated institutions' settlement account on
MEDICAL) and keeps its registration alive; the Medical issue adds real-time settlement at hospitals and
pharmacies through the Medical service.
"""

from __future__ import annotations

import logging

from citycard.apps.plugin import Plugin, Session
from citycard.core.records import AccountKind, LedgerId, TransferCode

from citycard.v1 import applications_pb2

__all__ = ["AID", "MedicalPlugin"]

AID = "D15600000503"  # MOHRSS RID D156000005, sub-application "social insurance 2" (medical insurance)
HEARTBEAT_S = 30.0
log = logging.getLogger("citycard.apps.medical")


class MedicalPlugin(Plugin):
    name = "medical"

    def manifest(self) -> applications_pb2.Manifest:
        return applications_pb2.Manifest(
            name=self.name, aid=AID, ledgers=[LedgerId.MEDICAL],
            transfer_codes=[TransferCode.CONTRIBUTION, TransferCode.SETTLEMENT, TransferCode.POOLED_FUND_PAYMENT,
                            TransferCode.REFUND],
            accounts=[
                applications_pb2.AccountSpec(name="individual_fund", ledger=LedgerId.MEDICAL, kind=AccountKind.FUND),
                applications_pb2.AccountSpec(name="pooled_fund", ledger=LedgerId.MEDICAL, kind=AccountKind.FUND),
                applications_pb2.AccountSpec(name="institutions", ledger=LedgerId.MEDICAL,
                                             kind=AccountKind.INSTITUTION_SETTLEMENT),
            ])

    def run(self, session: Session) -> None:
        while not session.wait(HEARTBEAT_S):
            session.applications.GetApplication(applications_pb2.GetApplicationRequest(name=self.name),
                                                metadata=session.metadata, timeout=10)
