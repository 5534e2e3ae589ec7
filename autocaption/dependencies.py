"""The dependency ranges autocaption is tested with, and one clear line when an installed version is outside.

The ranges are read from autocaption's own package metadata (pyproject.toml's `dependencies`), so the
check and the declaration cannot drift apart; CI runs the tests at both ends of every range. A version
older than the range is an error (the engine would fail in the middle of a batch); a newer one is a
warning (untested, probably fine; the fix is named in case it is not).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from autocaption.errors import AutocaptionError

log = logging.getLogger(__name__)

ENGINE = ("torch", "transformers")
TORCH_HINT = (
    " with the index of your build: --index-url https://download.pytorch.org/whl/rocm6.2 (the index of your "
    "ROCm version) or https://download.pytorch.org/whl/cu124 (NVIDIA)"
)


class DependencyError(AutocaptionError):
    """An installed dependency is missing or older than autocaption supports."""


@dataclass(frozen=True)
class Finding:
    name: str
    installed: str | None  # None: not installed
    wanted: SpecifierSet

    @property
    def newer(self) -> bool:
        """Above the tested range (rather than below it, or missing)."""
        if self.installed is None:
            return False
        try:
            version = Version(self.installed)
        except InvalidVersion:
            return False
        return all(version > Version(spec.version) for spec in self.wanted if spec.operator in ("<", "<="))

    @property
    def range(self) -> str:
        """ "transformers>=5.5,<5.25": the lower bound first, as people write it."""
        return self.name + ",".join(sorted(map(str, self.wanted), key=lambda spec: spec.startswith("<")))

    def fix(self) -> str:
        return f"pip install '{self.range}'" + (TORCH_HINT if self.name == "torch" else "")

    def line(self) -> str:
        have = f"{self.name} {self.installed} is installed" if self.installed else f"{self.name} is not installed"
        wanted = self.range
        if self.newer:
            return f"{have}, newer than autocaption is tested with ({wanted}); if it fails: {self.fix()}"
        return f"{have}; autocaption needs {wanted}: {self.fix()}"


def declared() -> dict[str, SpecifierSet]:
    """Each runtime dependency's range, from the installed autocaption's metadata (empty when autocaption
    runs from a source tree that was never installed: then there is nothing to compare with)."""
    try:
        requirements = metadata.requires("autocaption") or []
    except metadata.PackageNotFoundError:
        return {}
    ranges = {}
    for text in requirements:
        try:
            requirement = Requirement(text)
        except InvalidRequirement:
            continue
        if requirement.marker is None:  # extras ("heic", "test") are not runtime dependencies
            ranges[requirement.name.lower()] = requirement.specifier
    return ranges


def findings(names: Iterable[str] | None = None) -> list[Finding]:
    """The dependencies (all runtime ones, or `names`) whose installed version is outside their range."""
    ranges = declared()
    found = []
    for name in names if names is not None else ranges:
        wanted = ranges.get(name)
        if wanted is None:
            continue
        try:
            installed: str | None = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed is None or not wanted.contains(installed, prereleases=True):
            found.append(Finding(name, installed, wanted))
    return found


def check(names: Iterable[str] | None = None) -> None:
    """Raise DependencyError for a missing or too old dependency (the first one, in one line); warn once
    for each newer than tested."""
    for finding in findings(names):
        if not finding.newer:
            raise DependencyError(finding.line())
        log.warning("%s", finding.line())
