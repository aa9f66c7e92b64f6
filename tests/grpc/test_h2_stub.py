"""mypy's stubtest keeps citycard/server/_h2.pyi honest against the compiled module (as tests/core/test_stub.py
does for the ledger)."""

import os
import subprocess
import sys
from pathlib import Path

SERVER = Path(__file__).resolve().parents[2] / "citycard" / "server"


def test_compiled_h2_matches_its_stub(tmp_path: Path) -> None:
    # Only the stub, laid out under its package, so that mypy does not analyse the whole server with it.
    package = tmp_path / "citycard" / "server"
    package.mkdir(parents=True)
    (tmp_path / "citycard" / "__init__.pyi").write_text("")
    (package / "__init__.pyi").write_text("")
    (package / "_h2.pyi").write_text((SERVER / "_h2.pyi").read_text())
    done = subprocess.run([sys.executable, "-m", "mypy.stubtest", "citycard.server._h2", "--ignore-missing-stub"],
                          capture_output=True, text=True, check=False, env=os.environ | {"MYPYPATH": str(tmp_path)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success" in done.stdout
