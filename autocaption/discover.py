"""Finding the images under the paths a user names, with the config's include/exclude patterns.

Folders are walked in name order, symlinked folders followed once (a loop is reported, not walked
forever), our own temp files ignored. Problems are yielded as `Unreadable` items, never raised, so
one bad entry never stops the rest.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from autocaption.config import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, Config, WatchConfig
from autocaption.globs import GlobSet
from autocaption.paths import TEMP_PREFIX

# A child name no real file can have: "would anything inside this folder be excluded?"
_ANY_CHILD = "\0"


@dataclass(frozen=True)
class Candidate:
    path: Path  # absolute, as found (symlinks not resolved)
    relative: str  # posix path relative to the folder it was found under; rules match against it
    root: Path  # that folder: symlinks resolving outside it are never written through


@dataclass(frozen=True)
class Unreadable:
    path: Path
    reason: str


Found = Candidate | Unreadable


def _watch_for(folder: Path, config: Config) -> tuple[Path, WatchConfig | None]:
    """The watch entry containing `folder`, so its patterns and root apply; else the folder itself."""
    resolved = folder.resolve()
    for watch in config.watch:
        root = watch.path  # resolved when the config was read
        if resolved == root or root in resolved.parents:
            return root, watch
    return resolved, None


def scan(paths: Sequence[Path], config: Config) -> Iterator[Found]:
    for given in paths:
        path = given.absolute()
        if not os.path.lexists(path):
            yield Unreadable(path, "no such file or folder")
        elif path.is_dir():
            root, watch = _watch_for(path, config)
            include = watch.include if watch else GlobSet.of(DEFAULT_INCLUDE)
            exclude = watch.exclude if watch else GlobSet.of(DEFAULT_EXCLUDE)
            recursive = watch.recursive if watch else True
            yield from walk(path.resolve(), root, include, exclude, recursive=recursive)
        elif path.is_file():
            root, _ = _watch_for(path.parent, config)
            yield Candidate(path, relative_path(path.resolve(), root), root)
        elif path.is_symlink():
            yield Unreadable(path, "broken symlink or symlink loop")
        else:
            yield Unreadable(path, "not a regular file")


def relative_path(path: Path, root: Path) -> str:
    """`path` relative to `root` in posix form, for pattern matching; its name when outside `root`."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


def walk(top: Path, root: Path, include: GlobSet, exclude: GlobSet, *, recursive: bool = True) -> Iterator[Found]:
    """Images under `top` whose path relative to `root` is included and not excluded."""
    for item in walk_names(top, root, include, exclude, recursive=recursive):
        yield item if isinstance(item, Unreadable) else Candidate(Path(item[0]), item[1], root)


def walk_names(
    top: Path,
    root: Path,
    include: GlobSet,
    exclude: GlobSet,
    *,
    recursive: bool = True,
    on_temp: Callable[[str], None] | None = None,
) -> Iterator[tuple[str, str] | Unreadable]:
    """Like `walk`, as (path, relative) strings: no per-file pathlib, for reconciling 100,000 files.
    `on_temp` is told about our own temp files on the way (a reconcile removes stale ones)."""
    top_stat = top.stat()
    seen = {(top_stat.st_dev, top_stat.st_ino)}
    stack = [(str(top), "" if top == root else relative_path(top, root) + "/")]
    while stack:
        folder, prefix = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            yield Unreadable(Path(folder), f"cannot list folder: {exc.strerror or exc}")
            continue
        subfolders: list[tuple[str, str]] = []
        for entry in entries:
            if entry.name.startswith(TEMP_PREFIX):
                if on_temp is not None:
                    on_temp(entry.path)
                continue
            relative = prefix + entry.name
            try:
                is_dir = entry.is_dir()
                is_file = not is_dir and entry.is_file()
            except OSError as exc:
                kind = "broken symlink or symlink loop" if entry.is_symlink() else "cannot inspect"
                yield Unreadable(Path(entry.path), f"{kind}: {exc.strerror or exc}")
                continue
            if is_dir:
                if not recursive or exclude.matches(f"{relative}/{_ANY_CHILD}"):
                    continue
                try:
                    st = entry.stat()
                except OSError as exc:
                    yield Unreadable(Path(entry.path), f"cannot inspect: {exc.strerror or exc}")
                    continue
                if (st.st_dev, st.st_ino) in seen:
                    yield Unreadable(Path(entry.path), "symlink loop (folder already visited); skipped")
                    continue
                seen.add((st.st_dev, st.st_ino))
                subfolders.append((entry.path, relative + "/"))
            elif is_file:
                if include.matches(relative) and not exclude.matches(relative):
                    yield entry.path, relative
            elif entry.is_symlink() and include.matches(relative):
                yield Unreadable(Path(entry.path), "broken symlink or symlink loop")
        stack.extend(reversed(subfolders))  # so the first subfolder is walked next
