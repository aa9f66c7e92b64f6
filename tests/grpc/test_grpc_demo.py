from __future__ import annotations

from citycard.core.identity import check_character

from citycard.grpc_demo import run_grpc_demo


def test_the_grpc_demo_drives_a_day_and_shows_the_refusals(tmp_path):
    lines: list[str] = []
    run_grpc_demo(tmp_path / "demo", lines.append)
    text = "\n".join(lines)
    assert "medical (pid" in text and "transit (pid" in text
    assert "a fare from the MEDICAL ledger: PERMISSION_DENIED (MEDICAL_LEDGER_RESERVED)" in text
    assert "transit application's account: PERMISSION_DENIED (ACCOUNT_OUT_OF_SCOPE)" in text
    assert "which its manifest does not name: PERMISSION_DENIED (CODE_OUT_OF_SCOPE)" in text
    assert "nothing was booked: 0 of those transfers exist; 张伟's purse 47.00 -> 47.00" in text
    assert "TRANSFER_RESULT_EXCEEDS_CREDITS" in text
    assert "server stopped gracefully (exit code 0)" in text
    body = "37010219750312131"
    assert body + check_character(body) not in text  # ID numbers are shown masked
    assert "370102********" in text
