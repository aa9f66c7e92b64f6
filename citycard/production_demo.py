"""A small employer's cards, from the e-government roster to activated cards, on a fresh data directory.

``run_production_demo(data_dir, out)`` registers an employer, imports a sample roster (a GBK DBF with a
few bad rows, which are rejected and listed; importing it again changes nothing), takes in the
employees' photos (one too small, one missing), creates the production batch, exports the print data
and the employer's review package, imports the employer's verdicts (one row rejected: back to
correction), exports the production print file, lets a stand-in card producer print it, registers the
printed cards (one line of the producer's file does not match the batch and is not registered),
personalises the chips with a throw-away issuer's keys, delivers the cards to the employer, records
the hand-over, and activates cards at a designated institution (the holder's PIN replaces the initial
one on the chip), one of them also at the bank. ``citycard demo`` calls it.
"""

from __future__ import annotations

import csv
import datetime as _dt
import random
from collections.abc import Callable
from pathlib import Path

from citycard.apps.production import (
    ProductionStore,
    activate,
    activate_financial,
    batch_summary,
    create_batches,
    distribute_to_employer,
    export_print,
    export_review,
    hand_over,
    import_photos,
    import_review,
    import_roster,
    load_production_settings,
    missing_photos,
    open_chip,
    personalize_batch,
    register_printed,
)
from citycard.apps.production.producer import print_batch
from citycard.apps.production.sample import draw_photo, sample_people, write_photos, write_roster_dbf
from citycard.card import CardChannel, MasterKeys, MemoryTransport, Terminal
from citycard.core import clock
from citycard.core.identity import mask_id, unit_check_character
from citycard.core.registry import Registry

__all__ = ["run_production_demo"]

DEMO_OPERATOR = "demo-operator"
EMPLOYER = "91370100MA3C5LQX6E"
EMPLOYER_NAME = "济南示例科技有限公司"
OTHER_EMPLOYER = "91370102MA3C5LQX7" + unit_check_character("91370102MA3C5LQX7")  # not registered
INSTITUTION = "济南市社会保险事业服务中心历下分中心"
BANK = "中国工商银行济南泉城支行"
EMPLOYEES = 8
FIRST_SAMPLE = 500_000  # sample ID numbers far from the ones the other demo acts use


def run_production_demo(data_dir: Path, out: Callable[[str], None]) -> None:
    data_dir = Path(data_dir)
    files = data_dir / "production-demo-files"
    files.mkdir(parents=True, exist_ok=True)
    with Registry.open(data_dir) as registry:
        _Demo(registry, ProductionStore(registry.ledger, data_dir), data_dir, files, out).run()


class _Demo:
    def __init__(self, registry: Registry, store: ProductionStore, data_dir: Path, files: Path,
                 out: Callable[[str], None]) -> None:
        self.registry, self.store, self.files, self.out = registry, store, files, out
        self.settings = load_production_settings(data_dir)
        self.now = clock.now()

    def later(self, **delta: float) -> _dt.datetime:
        self.now += _dt.timedelta(**delta)
        return self.now

    def run(self) -> None:
        people = self.roster()
        self.photos(people)
        batch_id = self.batch()
        self.review(batch_id)
        self.produce(batch_id)
        self.distribute(batch_id)
        summary = batch_summary(self.store, batch_id)
        self.out(f"Batch {batch_id} now: {', '.join(f'{k} {v}' for k, v in summary.counts.items())}.")
        problems = self.registry.verify_audit()
        self.out(f"Audit log: {'intact' if not problems else f'{len(problems)} problem(s)'} "
                 f"({self.registry.audit_entry_count()} entries).")

    def roster(self) -> list:
        try:
            self.registry.employer(EMPLOYER)
        except ValueError:
            self.registry.add_employer(EMPLOYER, EMPLOYER_NAME, actor=DEMO_OPERATOR, at=self.now)
        people = sample_people(EMPLOYEES, [EMPLOYER], seed=5, first_index=FIRST_SAMPLE)
        good, twice = people[0], people[1]
        stranger = sample_people(1, [OTHER_EMPLOYER], first_index=FIRST_SAMPLE + 50)[0]
        bad_rows = [  # a mistyped ID number, a person listed twice, an employer the registry does not know
            (good.id_number[:-1] + ("0" if good.id_number[-1] != "0" else "1"), "王错号", good.gender_code,
             good.date_of_birth, "01", "CHN", EMPLOYER, "济南市历下区", "山东省济南市"),
            (twice.id_number, "李重复", twice.gender_code, twice.date_of_birth, "01", "CHN", EMPLOYER,
             "济南市历下区", "山东省济南市"),
            (stranger.id_number, stranger.name, stranger.gender_code, stranger.date_of_birth, "01", "CHN",
             OTHER_EMPLOYER, "济南市", "山东省济南市"),
        ]
        roster = write_roster_dbf(self.files / "roster.dbf", people, extra_rows=bad_rows)
        self.out(f"Roster from the e-government system: {roster.name} (dBase III, GBK), {len(people) + 3} records.")
        result = import_roster(self.registry, self.store, roster, actor=DEMO_OPERATOR, at=self.later(minutes=1))
        record = result.record
        self.out(f"  import {record.import_id}: {record.accepted} accepted, {record.rejected} rows rejected:")
        for problem in result.problems:
            self.out(f"    row {problem.row} ({problem.who}): {problem.field}: {problem.reason}")
        again = import_roster(self.registry, self.store, roster, actor=DEMO_OPERATOR, at=self.later(minutes=1))
        self.out(f"  the same file again: {'nothing changed' if again.already_imported else 'imported AGAIN (bug)'}.")
        return [person for person in people if person.id_number != twice.id_number]

    def photos(self, people: list) -> None:
        folder = self.files / "photos"
        write_photos(folder, people[:-2])
        (folder / f"{people[-2].id_number}.jpg").write_bytes(draw_photo(99, (200, 246)))  # too small
        result = import_photos(self.registry, self.store, folder, self.settings.photo, actor=DEMO_OPERATOR,
                               at=self.later(hours=1))
        self.out(f"Photos from the employer: {result.accepted} converted to "
                 f"{self.settings.photo.width} x {self.settings.photo.height} JPEG, {len(result.problems)} refused:")
        for problem in result.problems:
            self.out(f"    {mask_id(Path(problem.file).stem)}.jpg: {problem.field}: {problem.reason}")
        self.out(f"  persons still without a usable photo: {len(missing_photos(self.store))}.")

    def batch(self) -> str:
        result = create_batches(self.registry, self.store, self.settings, employers=[EMPLOYER], actor=DEMO_OPERATOR,
                                at=self.later(hours=1))
        batch = result.batches[0]
        self.out(f"Batch {batch.batch_id} for {batch.employer_name}: {batch.rows} cards ordered "
                 f"({batch.first_card}..{batch.last_card}); {len(result.held_back)} held back (no usable photo).")
        proof = export_print(self.registry, self.store, self.settings, [batch.batch_id], self.files / "to-producer",
                             actor=DEMO_OPERATOR, at=self.later(minutes=5))[0]
        self.out(f"  print data for the producer's proofs: {proof.table.relative_to(self.files)} "
                 f"({proof.rows} rows) and photos/.")
        return batch.batch_id

    def review(self, batch_id: str) -> None:
        package = export_review(self.registry, self.store, batch_id, self.files / "to-employer", actor=DEMO_OPERATOR,
                                at=self.later(minutes=5))
        self.out(f"Review package for the employer: {package.relative_to(self.files)} (CSV + HTML sheet with photos).")
        sheet = package / f"{batch_id}-review.csv"
        with open(sheet, encoding="utf-8-sig", newline="") as source:
            lines = list(csv.reader(source))
        rejected = random.Random(3).randrange(1, len(lines))
        for number, line in enumerate(lines[1:], start=1):
            line[9], line[10] = ("不通过", "姓名有错别字") if number == rejected else ("通过", "")
        verdicts = self.files / "verdicts.csv"
        with open(verdicts, "w", encoding="gbk", newline="") as target:
            csv.writer(target).writerows(lines)
        result = import_review(self.registry, self.store, batch_id, verdicts, actor=DEMO_OPERATOR,
                               at=self.later(days=2))
        self.out(f"  the employer's verdicts: {result.approved} approved, {result.rejected} rejected "
                 f"(back to correction: " + "; ".join(f"row {r['row']} {r['who']}: {r['reason']}"
                                                    for r in result.rejected_rows) + ").")

    def produce(self, batch_id: str) -> None:
        export = export_print(self.registry, self.store, self.settings, [batch_id], self.files / "to-producer",
                              actor=DEMO_OPERATOR, at=self.later(minutes=5))[0]
        self.out(f"Production print file: {export.rows} approved rows.")
        results = self.files / "printed.csv"
        lines = print_batch(export.folder, results, fmt="csv")
        with open(results, "a", encoding="utf-8", newline="") as target:  # the producer slipped a line in
            csv.writer(target).writerow(("A99999999", "0011223344556677", "0" * 32, lines[0]["ATR"]))
        result = register_printed(self.registry, self.store, batch_id, results, actor=DEMO_OPERATOR,
                                  at=self.later(days=10))
        self.out(f"  the producer printed {len(lines)} cards: {result.registered} registered, "
                 f"{len(result.mismatches)} mismatch not registered:")
        for problem in result.mismatches:
            self.out(f"    line {problem.row}: {problem.field}: {problem.reason}")
        keys_path = self.files / "demo-issuer-keys.json"
        if not keys_path.exists():
            MasterKeys.generate().save(keys_path)  # a throw-away issuer, readable by its owner only
        chips = personalize_batch(self.registry, self.store, self.settings, batch_id, MasterKeys.load(keys_path),
                                  actor=DEMO_OPERATOR, at=self.later(hours=2))
        self.out(f"  chips personalised: {chips.personalized} (holder data in EF05/EF06, keys diversified "
                 f"from the issuer's master keys).")

    def distribute(self, batch_id: str) -> None:
        delivered = distribute_to_employer(self.registry, self.store, batch_id, receiver="王经理",
                                           actor=DEMO_OPERATOR, at=self.later(days=1))
        handed = hand_over(self.registry, self.store, batch_id, actor=DEMO_OPERATOR, at=self.later(days=1))
        self.out(f"Distribution: {delivered.moved} cards to the employer (signed by 王经理), "
                 f"{handed.moved} handed to their holders.")
        rows = [row for row in self.store.rows(batch_id) if row.state.value == "handed_over"][:2]
        for index, row in enumerate(rows):
            person = self.registry.person(row.id_number)
            activate(self.registry, self.store, row.card_number, id_number=row.id_number, name=person.name,
                     institution=INSTITUTION, new_pin=f"{index + 2}80715", actor=DEMO_OPERATOR,
                     at=self.later(days=1))
            chip = Terminal(CardChannel(MemoryTransport(open_chip(self.store, row.card_number))), sam=None)  # type: ignore[arg-type]
            on_chip = chip.read_holder()
            self.out(f"  card {row.card_number} activated at {INSTITUTION} by {row.masked_id}: the chip says "
                     f"{on_chip.holder.name}, card {on_chip.identity.card_number}; registry: "
                     f"{self.registry.card(row.card_number).state.value}.")
        if rows:
            activate_financial(self.registry, self.store, rows[0].card_number, bank=BANK, actor=DEMO_OPERATOR,
                               at=self.later(days=3))
            self.out(f"  later, at {BANK}: financial functions of card {rows[0].card_number} opened.")
