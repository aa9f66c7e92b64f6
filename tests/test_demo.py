"""`citycard demo` runs end to end in a subprocess, explains itself, and is idempotent on a rerun."""

import os
import re
import subprocess
import sys


def run_demo(data_dir):
    done = subprocess.run([sys.executable, "-m", "citycard", "demo", "--data", str(data_dir)], capture_output=True,
                          text=True, timeout=300, env=os.environ | {"COLUMNS": "160"})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_demo_books_a_day_refuses_two_transfers_and_is_idempotent(tmp_path):
    first = run_demo(tmp_path)
    assert "accounts_must_have_the_same_ledger" in first
    assert "exceeds_credits" in first
    assert "ledger MEDICAL: debits 989.10 = credits 989.10: balanced" in first
    assert "ledger PURSE: debits 109.00 = credits 109.00: balanced" in first
    assert re.search(r"Zhang Wei's card \(e-purse\)\s*│\s*PURSE\s*│\s*100\.00\s*│\s*4\.00\s*│\s*0\.00\s*│\s*96\.00", first)
    assert "back office TAC check: valid" in first  # the card act ran through real pcscd
    assert "restored" in first and "denylist" in first.lower()  # the lifecycle act ran
    # The transit act: a card lost mid-rush is refused online and offline; both operators' days reconcile.
    assert "(online): DENYLISTED" in first and "(offline): DENYLISTED" in first
    assert "RECORD_FORGED" in first and first.count(": RECONCILED") == 2
    second = run_demo(tmp_path)
    assert "each resent transfer answered `exists`" in second
    assert "ledger PURSE: debits 109.00 = credits 109.00: balanced" in second
