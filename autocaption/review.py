"""What the review page does to photos: previews, a photo's full record, a person's correction written into
the photo, and "describe again". The web app (web/) is a thin layer of routes over this module.

A correction goes through the same lossless writer as the model's captions, as a person's caption (so
later runs keep it under `existing: keep`), under the photo's write lock shared with the daemon (one
writer at a time: the person's caption wins), and updates the JSON sidecar (the model's answers kept
beside it) and the journal in the same locked step.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autocaption import sidecar
from autocaption.atomic import write_atomic
from autocaption.catalog import Catalog, Image
from autocaption.config import Config
from autocaption.errors import AutocaptionError, ImageError, WriteError
from autocaption.images import open_picture
from autocaption.journal import Journal
from autocaption.locks import DaemonLock, PhotoLocks
from autocaption.paths import display
from autocaption.writers.metadata import Caption, MetadataWriter

log = logging.getLogger(__name__)

THUMBNAIL, PREVIEW = 320, 1600  # longest side, pixels


class NotFound(AutocaptionError):
    """No image with that id in the journal, or its file is gone."""


class Conflict(AutocaptionError):
    """The image cannot be corrected in its present state (not described yet)."""


@dataclass(frozen=True)
class Detail:
    image: Image
    document: dict[str, Any] | None  # its JSON sidecar
    sidecar: Path


class Review:
    def __init__(self, config: Config, journal: Journal) -> None:
        self.config = config
        self.journal = journal
        self.catalog = Catalog(journal)
        self.locks = PhotoLocks(config.state.dir)
        self.previews = config.state.dir / "previews"

    def image(self, image_id: int) -> Image:
        image = self.catalog.get(image_id)
        if image is None:
            raise NotFound(f"image {image_id}: not in the journal")
        return image

    def detail(self, image_id: int) -> Detail:
        image = self.image(image_id)
        found = sidecar.locate(image.path)
        return Detail(image, found.document, found.path)

    def preview(self, image_id: int, side: int) -> bytes:
        """An upright JPEG of the photo, `side` pixels at most, cached under state.dir/previews (made with
        draft decoding, so even a 50 MP photo takes milliseconds) and made again when the photo changes."""
        path = self.image(image_id).path
        try:
            st = path.stat()
        except OSError as exc:
            raise NotFound(f"{display(path)}: {exc.strerror or exc}") from None
        cached = self.previews / f"{image_id}-{side}-{st.st_size}-{st.st_mtime_ns}.jpg"
        try:
            return cached.read_bytes()
        except FileNotFoundError:
            pass
        try:
            picture = open_picture(path, max_pixels=self.config.images.max_pixels, draft_side=side)
        except ImageError as exc:
            raise NotFound(str(exc)) from None
        image = picture.image
        image.thumbnail((side, side))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        data = buffer.getvalue()
        self.previews.mkdir(parents=True, exist_ok=True)
        for stale in self.previews.glob(f"{image_id}-{side}-*.jpg"):  # an older version of the photo
            stale.unlink(missing_ok=True)
        write_atomic(cached, data)
        return data

    def correct(self, image_id: int, description: str, keywords: list[str]) -> Detail:
        """Write a person's description and keywords into the photo (or its XMP sidecar) and the sidecar."""
        image = self.image(image_id)
        path = image.path
        with self.locks.hold(path):
            found = sidecar.locate(path)
            if found.document is None:
                raise Conflict(f"{display(path)}: not described yet; correct it once it has a caption")
            caption = Caption(description, tuple(keywords), asked=True, person=True)
            record = MetadataWriter(self.config.output).write(path, self._root(path), caption)
            if record.file == "failed":
                raise WriteError(record.reason or f"{display(path)}: cannot write")
            stat = record.stat or path.stat()
            sidecar.write(found, sidecar.with_edit(found.document, description, keywords, record, stat))
            rows = self.journal.rows("SELECT fingerprint FROM images WHERE rowid = ?", [image_id])
            self.journal.done(path, stat, record.sha256, rows[0][0] if rows and rows[0][0] else "")
        log.info("%s: caption corrected on the review page", display(path))
        return self.detail(image_id)

    def describe_again(self, image_id: int) -> bool:
        """Queue the photo to be described again; True when a daemon is running to do it."""
        image = self.image(image_id)
        self.journal.describe_again(image.path)
        return DaemonLock(self.config.state.dir).holder() is not None

    def _root(self, path: Path) -> Path:
        """The watched folder holding the photo: symlinks leading outside it are never written through."""
        return next((w.path for w in self.config.watch if w.path in path.parents), path.parent)


def keywords_from(value: object) -> list[str]:
    """The keywords a request sent: a list of strings, each trimmed, empty ones and repeats dropped."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError("keywords must be a list of strings")
    seen: dict[str, str] = {}
    for item in value:
        word = item.strip()
        if word and word.casefold() not in seen:
            seen[word.casefold()] = word
    return list(seen.values())
