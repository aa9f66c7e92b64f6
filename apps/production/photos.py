"""Photo intake: the employers' photo files, matched to roster entries by ID number, checked, and
converted to the card producer's print specification (PhotoSpec: 358 x 441 pixels, 24-bit colour,
baseline JPEG, by default).

A photo file is named by the holder's ID number (``370102198503120038.jpg``; a lower-case x is read as X),
as employers are asked to name them. Each is checked, in this order, and refused with the reason:

- the file name is not a valid citizen ID number, or nobody with that number is on the roster;
- the file is empty or larger than SOURCE_BYTES_MAX;
- it is not an image, or not JPEG, PNG or BMP;
- it has more than SOURCE_PIXELS_MAX pixels, or its data is damaged or cut short;
- it is not in colour (grey-scale or black-and-white);
- it is smaller than the print size (a photo is never enlarged);
- its proportions (after the camera's EXIF orientation is applied) differ from the print size's by
  more than RATIO_TOLERANCE (a landscape or square shot; it is not cropped to fit).

A good photo is cropped to the exact proportions about its centre, resized, and encoded as JPEG
(the quality steps down if the file would exceed the specification's size). The converted file is
stored content-addressed under DIR/production/photos, and the entry's photo record points to it in the
same transaction, so a crash leaves either the old photo or the new one in force. A person whose
card is in a batch keeps the photo the batch was made with; a new photo for a person in correction
sends them back to waiting.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from citycard.core.identity import IdentityError, mask_id, validate_citizen_id
from citycard.core.lifecycle import Channel
from citycard.core.registry import Registry
from citycard.core.registry_records import as_instant
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ProductionError
from .settings import PhotoSpec
from .store import EntryState, PhotoRecord, ProductionStore

__all__ = [
    "PhotoImportResult",
    "PhotoProblem",
    "PhotoRejected",
    "convert_photo",
    "import_photos",
    "missing_photos",
]

SOURCE_BYTES_MAX = 10 * 2**20
SOURCE_PIXELS_MAX = 40_000_000
RATIO_TOLERANCE = 0.05
FORMATS = ("JPEG", "PNG", "BMP")
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
FILES_MAX = 500_000
CHUNK_PHOTOS = 2000  # photo records per LMDB transaction
JPEG_QUALITY_MIN = 50
JPEG_QUALITY_STEP = 10
MISSING_LISTED_MAX = 100_000
_NOT_COLOUR_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"})

Progress = Callable[[str, int, int | None], None]


class PhotoRejected(ValueError):
    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


@dataclass(frozen=True)
class PhotoProblem:
    file: str
    field: str
    reason: str
    who: str = ""

    def to_json(self) -> dict[str, str]:
        return {"file": self.file, "field": self.field, "reason": self.reason, "who": self.who}


@dataclass
class PhotoImportResult:
    accepted: int = 0
    unchanged: int = 0
    problems: list[PhotoProblem] = field(default_factory=list)
    back_from_correction: int = 0


@dataclass(frozen=True)
class Converted:
    data: bytes
    source_format: str
    source_size: tuple[int, int]
    source_sha256: str


# -- one photo ---------------------------------------------------------------------------------------------


def convert_photo(data: bytes, spec: PhotoSpec) -> Converted:
    """Check one photo file's bytes and convert them; PhotoRejected names what is wrong."""
    if not data:
        raise PhotoRejected("file", "is empty")
    if len(data) > SOURCE_BYTES_MAX:
        raise PhotoRejected("file", f"is {len(data)} bytes; at most {SOURCE_BYTES_MAX} are taken")
    try:
        opened = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError):
        raise PhotoRejected("format", "is not an image") from None
    source_format = str(opened.format)
    if source_format not in FORMATS:
        raise PhotoRejected("format", f"is {source_format}; photos are taken as {', '.join(FORMATS)}")
    width, height = opened.size
    if width * height > SOURCE_PIXELS_MAX:
        raise PhotoRejected("size", f"{width} x {height} pixels is more than {SOURCE_PIXELS_MAX} pixels")
    if source_format == "JPEG":
        opened.draft("RGB", (spec.width, spec.height))  # decode at a reduced scale that is still large enough
    try:
        opened.load()
    except (OSError, ValueError, SyntaxError):
        raise PhotoRejected("data", "the image data is damaged or cut short") from None
    image: Image.Image = ImageOps.exif_transpose(opened) or opened
    if image.mode in _NOT_COLOUR_MODES or (image.mode == "P" and _palette_is_grey(image)):
        raise PhotoRejected("colour", "is not a colour photo")
    image = _rgb(image)
    source_size = _source_size(width, height, image)
    _check_dimensions(source_size, spec)
    out = _fit(image, spec)
    return Converted(_encode_jpeg(out, spec), source_format, source_size, hashlib.sha256(data).hexdigest())


def _palette_is_grey(image: Image.Image) -> bool:
    palette = image.getpalette() or []
    return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3))


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB") if image.mode != "RGB" else image


def _source_size(width: int, height: int, image: Image.Image) -> tuple[int, int]:
    # The size the photo really has, as the camera meant it: a draft decode divides both sides by the
    # same power of two, and an EXIF rotation swaps them.
    if (image.width > image.height) != (width > height):
        width, height = height, width
    return width, height


def _check_dimensions(size: tuple[int, int], spec: PhotoSpec) -> None:
    width, height = size
    if width < spec.width or height < spec.height:
        raise PhotoRejected("size", f"{width} x {height} pixels is smaller than the print size "
                                    f"{spec.width} x {spec.height}; a photo is never enlarged")
    ratio = width / height
    if abs(ratio / spec.ratio - 1) > RATIO_TOLERANCE:
        raise PhotoRejected("proportions", f"{width}:{height} ({ratio:.3f}) is not the print size's "
                                           f"{spec.width}:{spec.height} ({spec.ratio:.3f}) within "
                                           f"{RATIO_TOLERANCE:.0%}")


def _fit(image: Image.Image, spec: PhotoSpec) -> Image.Image:
    width, height = image.size
    if width / height > spec.ratio:  # a little too wide: trim the sides
        kept = round(height * spec.ratio)
        box = ((width - kept) // 2, 0, (width - kept) // 2 + kept, height)
    else:  # a little too tall: trim top and bottom
        kept = round(width / spec.ratio)
        box = (0, (height - kept) // 2, width, (height - kept) // 2 + kept)
    return image.resize((spec.width, spec.height), Image.Resampling.LANCZOS, box=box)


def _encode_jpeg(image: Image.Image, spec: PhotoSpec) -> bytes:
    quality = spec.jpeg_quality
    while True:
        out = io.BytesIO()
        image.save(out, "JPEG", quality=quality, optimize=True, progressive=False, dpi=(350, 350))
        if out.tell() <= spec.bytes_max or quality <= JPEG_QUALITY_MIN:
            break
        quality -= JPEG_QUALITY_STEP
    if out.tell() > spec.bytes_max:
        raise PhotoRejected("size", f"does not compress to {spec.bytes_max} bytes even at quality {quality}")
    return out.getvalue()


def _convert_file(path: str, spec: PhotoSpec) -> Converted | PhotoRejected:
    """In a worker process: one file, converted or refused (never an exception across the pipe)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return PhotoRejected("file", f"cannot be read ({exc.strerror})")
    try:
        return convert_photo(data, spec)
    except PhotoRejected as rejected:
        return rejected


# -- intake ------------------------------------------------------------------------------------------------


def photo_files(source: Path) -> list[Path]:
    """The photo files in a folder (and its sub-folders), in name order."""
    if not source.is_dir():
        raise ProductionError("folder", "does not exist or is not a folder", file=str(source))
    files = sorted(path for path in source.rglob("*") if path.is_file() and not path.name.startswith("."))
    if len(files) > FILES_MAX:
        raise ProductionError("folder", f"holds {len(files)} files; at most {FILES_MAX} are taken at once",
                              file=str(source))
    return files


def import_photos(registry: Registry, store: ProductionStore, source: Path, spec: PhotoSpec, *, actor: str,
                  at: _dt.datetime | None = None, jobs: int = 1, progress: Progress | None = None
                  ) -> PhotoImportResult:
    at = as_instant(at)
    progress = progress or (lambda phase, done, total: None)
    result = PhotoImportResult()
    candidates = list(_candidates(store, photo_files(Path(source)), result))
    pending: list[PhotoRecord] = []
    converted_files = _convert_all([path for path, _ in candidates], spec, jobs)
    for done, ((path, id_number), converted) in enumerate(zip(candidates, converted_files, strict=True), start=1):
        record = _accept(store, path, id_number, converted, at, result)
        if record is not None:
            pending.append(record)
        if len(pending) == CHUNK_PHOTOS:
            _commit_photos(registry, store, pending, at, actor, result, final=False)
            pending = []
        if done % 100 == 0:
            progress("converting", done, len(candidates))
    _commit_photos(registry, store, pending, at, actor, result, final=True)
    progress("converting", len(candidates), len(candidates))
    return result


def _candidates(store: ProductionStore, files: Iterable[Path], result: PhotoImportResult
                ) -> Iterator[tuple[Path, str]]:
    for path in files:
        if path.suffix.lower() not in EXTENSIONS:
            result.problems.append(PhotoProblem(path.name, "format", f"{path.suffix or 'no extension'} is not "
                                                                     f"one of {', '.join(EXTENSIONS)}"))
            continue
        try:
            id_number = validate_citizen_id(path.stem, today=_dt.date.max).number
        except IdentityError as exc:
            result.problems.append(PhotoProblem(path.name, "file_name", f"is not an ID number ({exc.reason})",
                                                mask_id(path.stem)))
            continue
        entry = store.entry(id_number)
        who = mask_id(id_number)
        if entry is None:
            result.problems.append(PhotoProblem(path.name, "file_name", "nobody with this ID number is on the roster",
                                                who))
            continue
        current = store.photo(id_number)
        if current is not None and current.source_sha256 == _file_sha256(path):
            result.unchanged += 1  # the same file as last time: nothing to convert
            continue
        if entry.state is EntryState.BATCHED:
            result.problems.append(PhotoProblem(
                path.name, "file_name", f"the card is being made in batch {entry.batch_id} with the photo it has; "
                                        "the employer rejects the row in the review to change it", who))
            continue
        yield path, id_number


def _file_sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.stat().st_size <= SOURCE_BYTES_MAX else ""
    except OSError:
        return ""  # unreadable: the conversion says so


def _convert_all(paths: list[Path], spec: PhotoSpec, jobs: int) -> Iterator[Converted | PhotoRejected]:
    if jobs <= 1 or len(paths) < 2 * jobs:
        yield from (_convert_file(str(path), spec) for path in paths)
        return
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        yield from pool.map(_convert_file, [str(path) for path in paths], [spec] * len(paths), chunksize=64)


def _accept(store: ProductionStore, path: Path, id_number: str, converted: Converted | PhotoRejected,
            at: _dt.datetime, result: PhotoImportResult) -> PhotoRecord | None:
    who = mask_id(id_number)
    if isinstance(converted, PhotoRejected):
        result.problems.append(PhotoProblem(path.name, converted.field, converted.reason, who))
        return None
    record = PhotoRecord(id_number=id_number, sha256=hashlib.sha256(converted.data).hexdigest(),
                         source_name=path.name, source_sha256=converted.source_sha256,
                         source_format=converted.source_format, source_size=list(converted.source_size),
                         bytes=len(converted.data), taken_at=at.isoformat())
    _write_atomically(photo_path(store, record), converted.data)
    return record


def photo_path(store: ProductionStore, record: PhotoRecord) -> Path:
    return store.photos_dir / stored_photo_name(record)


def stored_photo_name(record: PhotoRecord) -> str:
    """The converted photo's file name in DIR/production/photos (a new photo never overwrites an old one)."""
    return f"{record.id_number}-{record.sha256[:16]}.jpg"


def _write_atomically(target: Path, data: bytes) -> None:
    # Renamed into place whole, but not synced file by file (that costs tens of milliseconds a photo):
    # a photo that a power cut truncates is caught at export, where its size must match its record.
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, target)


def _commit_photos(registry: Registry, store: ProductionStore, records: list[PhotoRecord], at: _dt.datetime,
                   actor: str, result: PhotoImportResult, *, final: bool) -> None:
    if not records and not (final and result.accepted):
        return
    stage = registry.begin(at)
    for record in records:
        store.put_photo(stage, record)
        entry = store.entry(record.id_number, stage)
        if entry is not None and entry.state is EntryState.CORRECTION:
            store.put_entry(stage, replace(entry, state=EntryState.WAITING, reason=None), entry)
            result.back_from_correction += 1
    result.accepted += len(records)
    if final:
        stage.audit(actor=actor, channel=Channel.BATCH, action="production.photo_import", subject="photos", at=at,
                    details={"accepted": result.accepted, "unchanged": result.unchanged,
                             "refused": len(result.problems), "back_from_correction": result.back_from_correction})
    stage.commit("taking in photos")


def missing_photos(store: ProductionStore, employers: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Persons waiting for a card without a usable photo: employer, masked ID number, name."""
    missing: list[dict[str, Any]] = []
    for employer in (employers if employers is not None else store.waiting_employers()):
        for id_number in store.waiting(employer, MISSING_LISTED_MAX):
            if store.photo(id_number) is None:
                entry = store.entry(id_number)
                missing.append({"employer": employer, "who": mask_id(id_number),
                                "name": entry.name if entry else "", "id_number": id_number})
                if len(missing) >= MISSING_LISTED_MAX:
                    return missing
    return missing
