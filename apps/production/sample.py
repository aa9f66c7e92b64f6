"""Sample data for the demo, the tests and the benchmark: insured persons with valid ID numbers and
Chinese names, written as an e-government roster (CSV in GBK or UTF-8, or a GBK DBF), and ID photos
drawn with Pillow. Deterministic for a seed; nothing here is a real person.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dbf
from citycard.core.identity import check_character
from PIL import Image, ImageDraw

__all__ = ["SamplePerson", "draw_photo", "iter_sample_people", "sample_id", "sample_people", "write_photos", "write_roster_csv", "write_roster_dbf"]

REGIONS = ("370102", "370103", "370104", "370105", "370112")  # districts of Jinan
SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤"
GIVEN = "伟芳娜秀英敏静丽强磊军洋勇艳杰娟涛明超秀兰霞平刚桂英华玉兰萍红鹏建华飞鑫波斌宇浩凯健俊帆帅旭宁龙林欣瑶晨曦子涵梓轩雨泽"
BIRTH_FIRST = _dt.date(1960, 1, 1)
SEQUENCES = 900  # sequence digits 100..999 per region and birth date
ROSTER_HEADER = ("身份证号码", "姓名", "性别", "出生日期", "民族", "国籍", "单位编号", "居住地", "户籍地")
DBF_FIELDS = "SFZHM C(18); XM C(30); XB C(1); CSRQ D; MZ C(2); GJ C(3); DWBH C(18); JZD C(100); HJD C(60)"
PHOTO_SIZE = (480, 591)  # a little larger than the print size, in its proportions


@dataclass(frozen=True)
class SamplePerson:
    id_number: str
    name: str
    gender_code: str  # 1 male, 2 female
    date_of_birth: _dt.date
    ethnicity: str
    employer: str
    residence: str
    household_registration: str


def sample_id(index: int) -> str:
    """The index-th sample ID number: unique for index < 5 * 900 * 16,000, valid check character."""
    sequence = 100 + index % SEQUENCES
    rest = index // SEQUENCES
    region = REGIONS[rest % len(REGIONS)]
    birth = BIRTH_FIRST + _dt.timedelta(days=rest // len(REGIONS))
    body = f"{region}{birth:%Y%m%d}{sequence:03d}"
    return body + check_character(body)


def sample_people(count: int, employers: list[str], *, seed: int = 1, first_index: int = 0) -> list[SamplePerson]:
    return list(iter_sample_people(count, employers, seed=seed, first_index=first_index))


def iter_sample_people(count: int, employers: list[str], *, seed: int = 1, first_index: int = 0
                       ) -> Iterator[SamplePerson]:
    """The sample people one at a time (a roster of any size without holding it)."""
    rng = random.Random(seed)
    for index in range(first_index, first_index + count):
        id_number = sample_id(index)
        given = "".join(rng.choice(GIVEN) for _ in range(rng.choice((1, 2, 2))))
        yield SamplePerson(
            id_number=id_number, name=rng.choice(SURNAMES) + given,
            gender_code="1" if int(id_number[16]) % 2 else "2",
            date_of_birth=_dt.date(int(id_number[6:10]), int(id_number[10:12]), int(id_number[12:14])),
            ethnicity=rng.choice(("01",) * 9 + ("03",)), employer=employers[index % len(employers)],
            residence=f"济南市历下区泉城路{rng.randint(1, 300)}号", household_registration="山东省济南市")


def _row(person: SamplePerson) -> tuple[str, ...]:
    return (person.id_number, person.name, "男" if person.gender_code == "1" else "女",
            person.date_of_birth.isoformat(), person.ethnicity, "CHN", person.employer, person.residence,
            person.household_registration)


def write_roster_csv(path: Path, people: Iterable[SamplePerson], *, encoding: str = "gbk",
                     extra_rows: Iterable[tuple[str, ...]] = ()) -> Path:
    with open(path, "w", encoding=encoding, newline="") as out:
        writer = csv.writer(out)
        writer.writerow(ROSTER_HEADER)
        writer.writerows(_row(person) for person in people)
        writer.writerows(extra_rows)
    return path


def write_roster_dbf(path: Path, people: Iterable[SamplePerson], *, extra_rows: Iterable[tuple[object, ...]] = ()
                     ) -> Path:
    """A GBK dBase III roster with the e-government system's pinyin field names."""
    table = dbf.Table(":memory:", DBF_FIELDS, codepage="cp936", dbf_type="db3", on_disk=False)
    table.open(dbf.READ_WRITE)
    for person in people:
        table.append((person.id_number, person.name, person.gender_code, person.date_of_birth, person.ethnicity,
                      "CHN", person.employer, person.residence, person.household_registration))
    for row in extra_rows:
        table.append(tuple(row))
    on_disk = table.new(str(path))
    with on_disk:
        for record in table:
            on_disk.append(record)
    table.close()
    return path


def draw_photo(seed: int, size: tuple[int, int] = PHOTO_SIZE, fmt: str = "JPEG") -> bytes:
    """A head-and-shoulders drawing on the usual light-blue ID photo background."""
    rng = random.Random(seed)
    width, height = size
    image = Image.new("RGB", size, (67 + rng.randint(0, 20), 142, 218))
    draw = ImageDraw.Draw(image)
    skin = (rng.randint(200, 240), rng.randint(160, 200), rng.randint(130, 170))
    cloth = (rng.randint(10, 80), rng.randint(10, 80), rng.randint(40, 120))
    draw.ellipse((width * 0.12, height * 0.68, width * 0.88, height * 1.3), fill=cloth)
    draw.rectangle((width * 0.42, height * 0.55, width * 0.58, height * 0.72), fill=skin)
    draw.ellipse((width * 0.28, height * 0.16, width * 0.72, height * 0.62), fill=skin)
    draw.ellipse((width * 0.26, height * 0.1, width * 0.74, height * 0.34), fill=(30, 25, 20))
    for eye_x in (0.4, 0.6):
        draw.ellipse((width * eye_x - 8, height * 0.37, width * eye_x + 8, height * 0.4), fill=(20, 20, 20))
    out = io.BytesIO()
    image.save(out, fmt, **({"quality": 88} if fmt == "JPEG" else {}))
    return out.getvalue()


def write_photos(folder: Path, people: Iterable[SamplePerson], *, size: tuple[int, int] = PHOTO_SIZE) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for index, person in enumerate(people):
        (folder / f"{person.id_number}.jpg").write_bytes(draw_photo(index, size))
        count += 1
    return count
