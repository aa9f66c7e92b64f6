"""mypy's stubtest keeps card/_des.pyi and card/_purchase.pyi honest against the compiled modules (as
tests/core/test_stub.py does for the ledger)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CARD = Path(__file__).resolve().parents[2] / "card"


@pytest.mark.parametrize("module", ["_des", "_purchase"])
def test_compiled_module_matches_its_stub(tmp_path: Path, module: str) -> None:
    # The package maps citycard.card onto card/, which mypy cannot follow through the editable install:
    # lay the stub out under its installed name for mypy to find.
    package = tmp_path / "citycard" / "card"
    package.mkdir(parents=True)
    (tmp_path / "citycard" / "__init__.pyi").write_text("")
    (package / "__init__.pyi").write_text("")
    (package / f"{module}.pyi").write_text((CARD / f"{module}.pyi").read_text())
    done = subprocess.run([sys.executable, "-m", "mypy.stubtest", f"citycard.card.{module}", "--ignore-missing-stub"],
                          capture_output=True, text=True, check=False,
                          env=os.environ | {"MYPYPATH": str(tmp_path)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success" in done.stdout
