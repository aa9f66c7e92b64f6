"""core/allocator.py: after keep_freed_memory(), megabytes freed are reused, not faulted in afresh."""

import subprocess
import sys

CHURN = """
import resource, sys
from citycard.core.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
def churn():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for round in range(50):  # batches of 1-3 MiB held together, then freed, as a server's requests are
        held = [bytes(1024 * 1024 * (1 + (round + k) % 3)) for k in range(4)]
        del held
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
churn()  # the first round may grow the heap either way
print(kept, churn())
"""


def page_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True).stdout
    kept, faults = out.split()
    return kept, int(faults)


def test_freed_megabytes_are_reused_without_page_faults():
    kept, faults_kept = page_faults("keep")
    assert kept == "True"
    _, faults_default = page_faults("default")
    # glibc's defaults map and unmap each block: about 11,000 faults here (each fresh page zeroed again)
    assert faults_default > 1000
    assert faults_kept < faults_default / 20
