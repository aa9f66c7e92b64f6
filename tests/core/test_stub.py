"""mypy's stubtest keeps core/_ledger.pyi honest against the compiled module."""

import os
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "core"


def test_compiled_core_matches_its_stub(tmp_path):
    # The package maps citycard.core onto core/, which mypy cannot follow through the editable install:
    # lay the stub out under its installed name for mypy to find.
    package = tmp_path / "citycard" / "core"
    package.mkdir(parents=True)
    (tmp_path / "citycard" / "__init__.pyi").write_text("")
    (package / "__init__.pyi").write_text("")
    (package / "_ledger.pyi").write_text((CORE / "_ledger.pyi").read_text())
    done = subprocess.run([sys.executable, "-m", "mypy.stubtest", "citycard.core._ledger", "--ignore-missing-stub"],
                          capture_output=True, text=True, env=os.environ | {"MYPYPATH": str(tmp_path)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success" in done.stdout
