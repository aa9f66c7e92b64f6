"""The ledger stream's requests, encoded by hand for speed, read back by the generated protobuf class."""

import numpy as np
import pytest
from citycard.apps.bus.ledger_link import stream_request, transfer_record
from citycard.core.records import TRANSFER_DTYPE

from citycard.v1 import ledger_pb2


def records(count: int) -> np.ndarray:
    return np.concatenate([transfer_record((1 << 100) + n, 0x11, 0x22 + n, 150 + n, 11) for n in range(count)])


@pytest.mark.parametrize("request_id", [1, 127, 128, 300, 2**32 + 5, 2**64 - 1])
def test_a_request_reads_back_as_the_message_would_carry_it(request_id):
    batch = records(3)
    wire = stream_request(request_id, batch)
    parsed = ledger_pb2.CreateTransfersStreamRequest.FromString(wire)
    assert parsed.request_id == request_id
    assert parsed.packed_transfers == batch.tobytes()
    assert list(parsed.transfers) == []
    assert wire == ledger_pb2.CreateTransfersStreamRequest(request_id=request_id,
                                                           packed_transfers=batch.tobytes()).SerializeToString()


def test_a_strided_slice_is_sent_as_its_records():
    batch = records(6)
    every_other = batch[::2]
    parsed = ledger_pb2.CreateTransfersStreamRequest.FromString(stream_request(9, every_other))
    received = np.frombuffer(parsed.packed_transfers, dtype=TRANSFER_DTYPE)
    assert received["amount"].tolist() == [150, 152, 154]


def test_records_of_another_layout_are_refused():
    with pytest.raises(TypeError, match="TRANSFER_DTYPE"):
        stream_request(1, np.zeros(2, dtype=np.uint64))
