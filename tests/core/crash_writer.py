"""A ledger writer for the crash test: books numbered batches forever and acknowledges each one.

Usage: python crash_writer.py DIR FIRST_BATCH. After `execute` returns (the batch is on disk) it
prints "ack N" and flushes; the test kills it with SIGKILL at a random moment.
"""

import sys

from citycard.core.ledger import Ledger, transfers_array
from citycard.core.records import LedgerId, TransferCode, TransferFlags

BATCH_TRANSFERS = 120
FUND, PERSON, PHARMACY, OPERATOR, PURSE, SHOP = 1, 2, 3, 4, 5, 6


def batch_rows(batch: int) -> list[dict]:
    """A batch whose parts depend on each other: contributions, a hold and its post, purse loads and fares."""
    base = batch * BATCH_TRANSFERS
    rows = []
    for n in range(BATCH_TRANSFERS // 6):
        i = base + n * 6
        rows += [
            dict(id=i + 1, debit_account_id=FUND, credit_account_id=PERSON, amount=500, ledger=LedgerId.MEDICAL,
                 code=TransferCode.CONTRIBUTION),
            dict(id=i + 2, debit_account_id=PERSON, credit_account_id=PHARMACY, amount=300, ledger=LedgerId.MEDICAL,
                 code=TransferCode.SETTLEMENT, flags=TransferFlags.PENDING),
            dict(id=i + 3, pending_id=i + 2, amount=250, flags=TransferFlags.POST_PENDING_TRANSFER),
            dict(id=i + 4, debit_account_id=OPERATOR, credit_account_id=PURSE, amount=1000, ledger=LedgerId.PURSE,
                 code=TransferCode.LOAD, flags=TransferFlags.LINKED),
            dict(id=i + 5, debit_account_id=PURSE, credit_account_id=SHOP, amount=200, ledger=LedgerId.PURSE,
                 code=TransferCode.PURCHASE, flags=TransferFlags.LINKED),
            dict(id=i + 6, debit_account_id=PURSE, credit_account_id=SHOP, amount=150, ledger=LedgerId.PURSE,
                 code=TransferCode.PURCHASE),
        ]
    return rows


def main() -> None:
    directory, batch = sys.argv[1], int(sys.argv[2])
    ledger = Ledger(directory, map_size_bytes=2**30)
    print("ready", flush=True)
    while True:
        results = ledger.create_transfers(transfers_array(batch_rows(batch)))
        if (results["status"] != 0).any():
            print(f"refused {batch} {results['status'].tolist()}", flush=True)
            sys.exit(1)
        print(f"ack {batch}", flush=True)
        batch += 1


if __name__ == "__main__":
    main()
