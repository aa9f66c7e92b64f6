"""Medical settlements through gRPC next to the in-process ledger, measured in one run.

    python -m benches.medical --json

1. in-process: the settlement core's batch throughput (batches of 8,189 transfers through
   ``Ledger.create_transfers``, one fsync each), the reference (the same measurement as benches.grpc).
2. settle: a real ``citycard serve`` (its own process) with the medical application (its own process,
   serving citycard.v1.Medical), and ``--clients`` client processes, each with ``--in-flight`` terminals
   (threads) settling pharmacy and outpatient bills of 5 to 20 items for their own insured persons, each
   terminal one bill after the other, through Medical.Settle. Every settlement is real: the card checked
   against the core, the account looked up, the split, a linked chain on MEDICAL, the expense record
   (intent fsync'ed before the booking, marked booked after). Reported: settlements per second over all
   clients, transfers per second, the CPU the core and the medical application spent per settlement, and
   ``ratio_settlements_to_inprocess_transfers``.

What the ratio means: a settlement is a chain of round trips (the terminal to the medical application;
the medical application to the core for the card, the account and the booking; an fsync'ed SQLite
commit), not a batch, so it is orders of magnitude below the core's batch throughput on purpose. The
medical application groups what concurrent settlements share (apps/medical/group_commit.py: one
LookupAccounts, one SQLite transaction of intents, one CreateTransfers per group), so the figure grows
with the terminals in flight until the machine's CPU is spent; the card check stays one core call per bill.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 30.0
CODES = ("XA01", "XA02", "XB01", "XB02", "XC01", "S001", "S002")


def start(directory: Path) -> tuple[subprocess.Popen[bytes], dict, dict]:
    ready, medical_ready = directory / "ready.json", directory / "medical" / "ready.json"
    with open(directory / "server.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "citycard.server", "--data", str(directory), "--listen", "127.0.0.1:0",
             "--plugins", "medical", "--ready-file", str(ready)], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env={**os.environ, "CITYCARD_MEDICAL_DIR": str(directory / "medical")})
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (ready.exists() and medical_ready.exists()):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start; see {directory / 'server.log'}")
        time.sleep(0.05)
    return process, json.loads(ready.read_text()), json.loads(medical_ready.read_text())


def _auth(path: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {Path(path).read_text().strip()}"),)


def prepare(core: dict, medical_ready: dict, persons: int) -> tuple[list[tuple[str, str]], str]:
    """``persons`` insured persons with cards and well-funded accounts, a designated hospital; its token."""
    import grpc
    from citycard.core.identity import check_character, unit_check_character

    from citycard.v1 import cards_pb2, cards_pb2_grpc, medical_pb2, medical_pb2_grpc

    operator, medical_operator = _auth(core["operator_token_file"]), _auth(medical_ready["operator_token_file"])
    cards = cards_pb2_grpc.CardsStub(grpc.insecure_channel(core["address"]))
    medical = medical_pb2_grpc.MedicalStub(grpc.insecure_channel(medical_ready["address"]))
    people = []
    for n in range(persons):
        body = f"370102{1950 + n // 900}0101{100 + n % 900:03d}"
        id_number = body + check_character(body)
        cards.AddPerson(cards_pb2.AddPersonRequest(
            actor="bench", id_number=id_number, name="测试", gender=cards_pb2.GENDER_MALE if int(body[-1]) % 2
            else cards_pb2.GENDER_FEMALE, date_of_birth=f"{body[6:10]}-01-01", residence="济南市",
            household_registration="济南市", status=cards_pb2.PERSON_STATUS_RETIRED), metadata=operator,
            timeout=CALL_TIMEOUT_S)
        card = cards.IssueCard(cards_pb2.IssueCardRequest(actor="bench", holder_id_number=id_number),
                               metadata=operator, timeout=CALL_TIMEOUT_S).card
        people.append((id_number, card.card_number))
    unit = "91370100MA3C5LQX6" + unit_check_character("91370100MA3C5LQX6")
    csv = "month,employer,id_number,insurance,base_fen,employer_fen,individual_fen\n" + "".join(
        f"2026-10,{unit},{id_number},medical,10000000000,0,0\n" for id_number, _ in people)
    medical.ImportContributions(medical_pb2.ImportContributionsRequest(source="bench.csv", csv=csv.encode()),
                                metadata=medical_operator, timeout=CALL_TIMEOUT_S)
    token = medical.AddInstitution(medical_pb2.AddInstitutionRequest(institution=medical_pb2.Institution(
        code="H3701001", name="基准医院", kind="hospital", level=3, opened="2020-01-01",
        services=[medical_pb2.VISIT_TYPE_OUTPATIENT, medical_pb2.VISIT_TYPE_PHARMACY])),
        metadata=medical_operator, timeout=CALL_TIMEOUT_S)
    return people, token.bearer_token


def client(index: int, address: str, token: str, people: list[tuple[str, str]], bills: int, in_flight: int,
           start_at: float, results: multiprocessing.Queue) -> None:
    """One client process: ``in_flight`` terminals (threads), each settling its share of ``bills`` one after
    the other; terminal t takes bills t, t + in_flight, ... (the persons repeat with the same period, so
    no two terminals settle for the same person at once)."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from citycard.v1 import medical_pb2, medical_pb2_grpc

    rng = random.Random(index)
    stub = medical_pb2_grpc.MedicalStub(grpc.insecure_channel(address))
    metadata = (("authorization", f"Bearer {token}"),)
    requests = []
    for n in range(bills):
        id_number, card = people[n % len(people)]
        requests.append(medical_pb2.SettleRequest(
            institution="H3701001", bill_no=f"c{index}b{n}", card_number=card, id_number=id_number,
            visit=rng.choice((medical_pb2.VISIT_TYPE_OUTPATIENT, medical_pb2.VISIT_TYPE_PHARMACY)),
            items=[medical_pb2.BillItem(code=rng.choice(CODES), quantity=rng.randint(1, 5),
                                        unit_price_fen=rng.randint(100, 50_000)) for _ in range(rng.randint(5, 20))]))
    while time.time() < start_at:
        time.sleep(0.001)
    def terminal(first: int) -> int:
        payments = 0
        for request in requests[first::in_flight]:
            payments += len(stub.Settle(request, metadata=metadata, timeout=CALL_TIMEOUT_S).receipt.payments)
        return payments

    with ThreadPoolExecutor(in_flight) as pool:
        started = time.perf_counter()
        transfers = sum(pool.map(terminal, range(in_flight)))
    results.put((index, time.perf_counter() - started, bills, transfers))


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle(core: dict, medical_ready: dict, clients: int, in_flight: int, bills: int, persons_per_client: int,
           core_pid: int) -> dict:
    people, token = prepare(core, medical_ready, clients * persons_per_client)
    pids = {"core": core_pid, "medical": int(medical_ready["pid"])}
    # spawn, not fork: this process has used gRPC (prepare), and a forked child of a gRPC process can hang
    spawn = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue = spawn.Queue()
    start_at = time.time() + 5.0  # the spawned clients import grpc and build their bills first
    workers = [spawn.Process(target=client, args=(
        n, medical_ready["address"], token, people[n * persons_per_client:(n + 1) * persons_per_client], bills,
        in_flight, start_at, results)) for n in range(clients)]
    for worker in workers:
        worker.start()
    cpu_before = {name: cpu_s(pid) for name, pid in pids.items()}
    answers = [results.get(timeout=600) for _ in workers]
    cpu_used = {name: cpu_s(pid) - cpu_before[name] for name, pid in pids.items()}
    for worker in workers:
        worker.join()
    elapsed = max(answer[1] for answer in answers)
    total = sum(answer[2] for answer in answers)
    transfers = sum(answer[3] for answer in answers)
    return {"clients": clients, "in_flight_per_client": in_flight, "settlements": total, "transfers": transfers, "seconds": round(elapsed, 3),
            "settlements_per_s": round(total / elapsed, 1), "transfers_per_s": round(transfers / elapsed, 1),
            # CPU spent per settlement by the core server and by the medical application (spawn to the end)
            **{f"cpu_ms_per_settlement_{name}": round(1000 * used / total, 2) for name, used in cpu_used.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--dir", default="var/bench-medical")
    parser.add_argument("--inprocess-batches", type=int, default=30)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--in-flight", type=int, default=8, help="terminals per client, each one bill at a time")
    parser.add_argument("--bills", type=int, default=150, help="settlements per client")
    parser.add_argument("--persons-per-client", type=int, default=8)
    args = parser.parse_args()
    from benches.grpc import inprocess, machine

    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=root))
    try:
        reference = inprocess(work, args.inprocess_batches)
        served = work / "served"
        served.mkdir()
        process, core, medical_ready = start(served)
        try:
            measured = settle(core, medical_ready, args.clients, args.in_flight, args.bills,
                              max(args.persons_per_client, args.in_flight), process.pid)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"machine": machine(), "inprocess": reference, "settle": measured,
              "ratio_settlements_to_inprocess_transfers": round(
                  measured["settlements_per_s"] / reference["transfers_per_s"], 6)}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"in-process ledger: {reference['transfers_per_s']:,} transfers/s")
        print(f"Medical.Settle over gRPC, {measured['clients']} clients: {measured['settlements_per_s']:,} "
              f"settlements/s ({measured['transfers_per_s']:,} transfers/s)")
        print(f"ratio: {report['ratio_settlements_to_inprocess_transfers']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
