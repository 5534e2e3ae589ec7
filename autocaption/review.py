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
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autocaption import sidecar
from autocaption.atomic import write_atomic
from autocaption.catalog import Catalog, Image
from autocaption.config import Config
from autocaption.errors import AutocaptionError, ImageError, WriteError
from autocaption.images import open_picture
from autocaption.journal import EDITED, Journal
from autocaption.locks import DaemonLock, PhotoLocks
from autocaption.paths import display
from autocaption.textclean import carriable_keyword
from autocaption.writers.metadata import Caption, MetadataWriter

log = logging.getLogger(__name__)

THUMBNAIL, PREVIEW = 320, 1600  # longest side, pixels
# Decoding a 196 MP PNG takes ~0.8 GB; eight at once took the page to 9 GB. Two at a time, and each preview
# is made once: a request for one being made waits for it and reads the cache.
DECODES_AT_ONCE = 2


class NotFound(AutocaptionError):
    """No image with that id in the journal, or its file is gone."""


class Conflict(AutocaptionError):
    """The image cannot be corrected in its present state (not described yet)."""


@dataclass(frozen=True)
class Detail:
    image: Image
    document: dict[str, Any] | None  # its JSON sidecar
    sidecar: Path
    description: str | None = None  # what the photo carries now (a person's, the model's or another tool's)
    keywords: tuple[str, ...] = ()
    texts: dict[str, str] = field(default_factory=dict)  # its title, alt text, extended description (x-default)

    @property
    def sha256(self) -> str | None:
        """The content the results are for (after our last write): a correction must be of this photo."""
        document = self.document or {}
        digest = (document.get("written") or {}).get("sha256") or document.get("image", {}).get("sha256")
        return str(digest) if digest else None


class Review:
    def __init__(self, config: Config, journal: Journal) -> None:
        self.config = config
        self.journal = journal
        self.catalog = Catalog(journal)
        self.locks = PhotoLocks(config.state.dir)
        self.previews = config.state.dir / "previews"
        self._decodes = threading.BoundedSemaphore(DECODES_AT_ONCE)
        self._making: dict[Path, threading.Lock] = {}
        self._making_lock = threading.Lock()

    def image(self, image_id: int) -> Image:
        image = self.catalog.get(image_id)
        if image is None:
            raise NotFound(f"image {image_id}: not in the journal")
        return image

    def detail(self, image_id: int) -> Detail:
        image = self.image(image_id)
        found = sidecar.locate(image.path)
        writer = MetadataWriter(self.config.output)
        description, keywords = writer.carried(image.path)
        return Detail(image, found.document, found.path, description, keywords, writer.carried_texts(image.path))

    def preview(self, image_id: int, side: int) -> bytes:
        """An upright JPEG of the photo, `side` pixels at most, cached under state.dir/previews (made with
        draft decoding, so even a 50 MP photo takes milliseconds) and made again when the photo changes."""
        path = self.image(image_id).path
        try:
            st = path.stat()
        except OSError as exc:
            raise NotFound(f"{display(path)}: {exc.strerror or exc}") from None
        cached = self.previews / f"{image_id}-{side}-{st.st_size}-{st.st_mtime_ns}.jpg"
        with self._making_lock:
            making = self._making.setdefault(cached, threading.Lock())
        try:
            with making:
                try:
                    return cached.read_bytes()
                except FileNotFoundError:
                    pass
                with self._decodes:
                    data = self._make_preview(path, side)
                if not self.journal.read_only:  # --read-only writes nothing, previews included
                    self.previews.mkdir(parents=True, exist_ok=True)
                    for stale in self.previews.glob(f"{image_id}-{side}-*.jpg"):  # an older version of the photo
                        stale.unlink(missing_ok=True)
                    write_atomic(cached, data)
                return data
        finally:
            with self._making_lock:
                self._making.pop(cached, None)

    def _make_preview(self, path: Path, side: int) -> bytes:
        try:
            picture = open_picture(path, max_pixels=self.config.images.max_pixels, draft_side=side)
        except ImageError as exc:
            raise NotFound(str(exc)) from None
        image = picture.image
        image.thumbnail((side, side))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        return buffer.getvalue()

    def correct(
        self, image_id: int, description: str | None, keywords: list[str] | None, seen: str, alt_text: str | None = None
    ) -> Detail:  # fmt: skip
        """Write a person's description, keywords and/or alt text (None: left as the photo has it) into the photo
        (or its XMP sidecar) and the sidecar. `seen`: the sha256 the person's page showed, so a photo replaced since
        (another file under the same name) is never marked done with the old photo's answers."""
        path = self._present(image_id)
        writer = MetadataWriter(self.config.output)
        with self.locks.hold(path):
            found = sidecar.locate(path)
            if found.document is None:
                raise Conflict(f"{display(path)}: not described yet; correct it once it has a caption")
            try:
                digest = sidecar.hash_file(path)
            except OSError as exc:
                raise NotFound(f"{display(path)}: {exc.strerror or exc}") from None
            if digest != seen or not sidecar.describes(found.document, digest):
                raise Conflict(f"{display(path)}: the photo changed since it was described; reload the page")
            texts = (("alt_text", "x-default", alt_text),) if alt_text is not None else ()
            caption = Caption(description, None if keywords is None else tuple(keywords), asked=True, person=True,
                              texts=texts)  # fmt: skip
            record = writer.write(path, self._root(path), caption)
            if record.file == "failed":
                raise WriteError(record.reason or f"{display(path)}: cannot write")
            stat = record.stat or path.stat()
            previous = found.document.get("edited") or {}
            document = sidecar.with_edit(
                found.document,
                description if description is not None else previous.get("description"),
                keywords if keywords is not None else list(writer.carried(path)[1]),
                record,
                stat,
                alt_text,
                _changed(description=description, keywords=keywords, alt_text=alt_text),
            )
            sidecar.write(found, document)
            rows = self.journal.rows("SELECT fingerprint FROM images WHERE rowid = ?", [image_id])
            fingerprint = rows[0][0] if rows and rows[0][0] else ""
            self.journal.done(path, stat, record.sha256, fingerprint, texts={EDITED: sidecar.edited_text(document)})
        log.info("%s: caption corrected on the review page", display(path))
        return self.detail(image_id)

    def _present(self, image_id: int) -> Path:
        """The photo's path, when its file is still there."""
        path = self.image(image_id).path
        if not path.is_file():
            raise NotFound(f"{display(path)}: the photo is no longer there (deleted or moved)")
        return path

    def describe_again(self, image_id: int) -> bool:
        """Queue the photo to be described again; True when a daemon is running to do it."""
        self.journal.describe_again(self._present(image_id))
        return DaemonLock(self.config.state.dir).holder() is not None

    def _root(self, path: Path) -> Path:
        """The watched folder holding the photo: symlinks leading outside it are never written through."""
        return next((w.path for w in self.config.watch if w.path in path.parents), path.parent)


def _changed(**fields: object) -> list[str]:
    """The fields a correction writes (those given)."""
    return [name for name, value in fields.items() if value is not None]


def keywords_from(value: object) -> list[str]:
    """The keywords a request sent: a list of strings, each trimmed and made carriable (textclean), empty
    ones and repeats dropped."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError("keywords must be a list of strings")
    seen: dict[str, str] = {}
    for item in value:
        word = carriable_keyword(item)
        if word and word.casefold() not in seen:
            seen[word.casefold()] = word
    return list(seen.values())
