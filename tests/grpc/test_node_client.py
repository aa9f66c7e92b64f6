"""A second, independent gRPC implementation (Node's @grpc/grpc-js, with the .proto files loaded at run
time by @grpc/proto-loader) talks to the server: the API does not depend on citycard's Python stubs.
``make test`` installs the npm packages (``npm ci --prefix examples/node-client``)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from grpc_helpers import add_person_with_card, citizen_id

CLIENT_DIR = Path(__file__).resolve().parents[2] / "examples" / "node-client"


def test_a_node_client_built_from_the_protos_alone(server):
    node = shutil.which("node")
    assert node, "Node.js is required (scripts/install-system-deps installs it)"
    assert (CLIENT_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(), \
        "run `make test` (or `npm ci --prefix examples/node-client`) to install the Node client's packages"
    card_number = add_person_with_card(server, citizen_id(sequence=141), "吴九", load_fen=1_000)
    result = subprocess.run(
        [node, str(CLIENT_DIR / "client.js"), "--server", server.address,
         "--operator-token-file", server.ready["operator_token_file"],
         "--enrolment-token-file", server.ready["enrolment_token_file"], "--card", card_number],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["application"] == "node-kiosk"
    assert report["card_state"] == "CARD_STATE_ACTIVE"
    assert report["unary_errors"] == 0
    assert report["stream"] == [{"request_id": "7", "errors": 0}, {"request_id": "8", "errors": 0},
                                {"request_id": "9", "errors": 0}]  # 9: two transfers in the packed form
    assert report["medical"] == "PERMISSION_DENIED" and report["medical_has_details"]
    assert report["takings_fen"] == 120 + 80 + 80 + 80 + 50 + 50
