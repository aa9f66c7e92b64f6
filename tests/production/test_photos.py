"""Photo intake: a photo of each bad kind is refused with its reason, good ones are converted to the print
specification, and the persons without a usable photo are listed."""

from __future__ import annotations

import io

import pytest
from citycard.apps.production import (
    EntryState,
    PhotoSpec,
    convert_photo,
    import_photos,
    import_roster,
    missing_photos,
)
from citycard.apps.production.photos import PhotoRejected, photo_path
from citycard.apps.production.sample import draw_photo
from PIL import Image

from .helpers import Production, ordered_batch, roster_with

SPEC = PhotoSpec()


def _image(size=(480, 591), mode="RGB", fmt="JPEG", colour=(180, 120, 90), **save) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, colour if mode in ("RGB", "RGBA") else 128).save(out, fmt, **save)
    return out.getvalue()


def _rejected(data: bytes) -> PhotoRejected:
    with pytest.raises(PhotoRejected) as refused:
        convert_photo(data, SPEC)
    return refused.value


@pytest.mark.parametrize(("data", "field", "words"), [
    (b"", "file", "empty"),
    (b"%PDF-1.4 not a photo at all", "format", "not an image"),
    (_image(fmt="GIF", mode="P"), "format", "GIF"),
    (_image(fmt="TIFF"), "format", "TIFF"),
    (_image()[:1500], "data", "damaged or cut short"),
    (_image(mode="L"), "colour", "not a colour photo"),
    (_image(size=(300, 369)), "size", "smaller than the print size"),
    (_image(size=(640, 480)), "proportions", "not the print size's"),
    (_image(size=(600, 600)), "proportions", "not the print size's"),
], ids=["empty", "not-an-image", "gif", "tiff", "truncated", "grey", "too-small", "landscape", "square"])
def test_a_photo_of_each_bad_kind_is_refused(data: bytes, field: str, words: str) -> None:
    refused = _rejected(data)
    assert refused.field == field and words in refused.reason


def test_a_file_larger_than_the_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from citycard.apps.production import photos

    monkeypatch.setattr(photos, "SOURCE_BYTES_MAX", 1000)
    assert _rejected(draw_photo(1)).field == "file"


@pytest.mark.parametrize("source", [
    _image(size=(716, 882)), _image(size=(480, 600)), _image(fmt="PNG", mode="RGBA", colour=(10, 200, 30, 0)),
    _image(fmt="BMP"), draw_photo(3, (1432, 1764)),
], ids=["double-size", "a-little-tall", "png-transparent", "bmp", "large-jpeg"])
def test_good_photos_become_the_print_specification(source: bytes) -> None:
    converted = convert_photo(source, SPEC)
    image = Image.open(io.BytesIO(converted.data))
    assert (image.format, image.size, image.mode) == ("JPEG", (358, 441), "RGB")
    assert len(converted.data) <= SPEC.bytes_max and not image.info.get("progressive")


def test_the_camera_orientation_is_applied_before_the_proportions_are_checked() -> None:
    landscape = Image.new("RGB", (591, 480), (200, 150, 120))
    exif = landscape.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    out = io.BytesIO()
    landscape.save(out, "JPEG", exif=exif.tobytes())
    converted = convert_photo(out.getvalue(), SPEC)
    assert converted.source_size == (480, 591) and Image.open(io.BytesIO(converted.data)).size == (358, 441)


def test_intake_matches_files_to_roster_entries_and_lists_who_is_missing(prod: Production) -> None:
    people = prod.people(5)
    import_roster(prod.registry, prod.store, roster_with(prod, people), actor="op")
    folder = prod.photos(people[:3])
    (folder / f"{people[3].id_number.lower()}.PNG").write_bytes(_image(size=(300, 369), fmt="PNG"))  # too small
    (folder / "370102199901011234.jpg").write_bytes(draw_photo(1))  # not a valid ID number
    stranger = prod.people(1, first_index=900)[0]
    (folder / f"{stranger.id_number}.jpg").write_bytes(draw_photo(2))  # nobody on the roster
    (folder / "notes.txt").write_text("photos for the card office")
    result = import_photos(prod.registry, prod.store, folder, SPEC, actor="op")
    problems = {problem.file: (problem.field, problem.reason) for problem in result.problems}
    assert result.accepted == 3 and len(problems) == 4
    assert problems[f"{people[3].id_number.lower()}.PNG"][0] == "size"
    assert "not an ID number" in problems["370102199901011234.jpg"][1]
    assert "not on the roster" in problems[f"{stranger.id_number}.jpg"][1] or "nobody" in problems[
        f"{stranger.id_number}.jpg"][1]
    assert problems["notes.txt"][0] == "format"
    record = prod.store.photo(people[0].id_number)
    stored = photo_path(prod.store, record)
    assert Image.open(stored).size == (358, 441) and record.source_name == f"{people[0].id_number}.jpg"
    assert sorted(m["id_number"] for m in missing_photos(prod.store)) == sorted(p.id_number for p in people[3:])
    again = import_photos(prod.registry, prod.store, folder, SPEC, actor="op")
    assert again.accepted == 0 and again.unchanged == 3


def test_a_batched_person_keeps_the_batch_photo(prod: Production) -> None:
    batch_id, people = ordered_batch(prod, 2)
    folder = prod.files / "new-photos"
    folder.mkdir()
    (folder / f"{people[0].id_number}.jpg").write_bytes(draw_photo(77))
    before = prod.store.photo(people[0].id_number)
    result = import_photos(prod.registry, prod.store, folder, SPEC, actor="op")
    assert result.accepted == 0 and batch_id in result.problems[0].reason
    assert prod.store.photo(people[0].id_number) == before
    assert prod.store.entry(people[0].id_number).state is EntryState.BATCHED


def test_parallel_conversion_gives_the_same_photos(prod: Production) -> None:
    people = prod.people(6)
    import_roster(prod.registry, prod.store, roster_with(prod, people), actor="op")
    result = import_photos(prod.registry, prod.store, prod.photos(people), SPEC, actor="op", jobs=2)
    assert result.accepted == 6
    single = convert_photo((prod.files / "photos" / f"{people[5].id_number}.jpg").read_bytes(), SPEC)
    assert photo_path(prod.store, prod.store.photo(people[5].id_number)).read_bytes() == single.data
