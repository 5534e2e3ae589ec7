"""The declared dependency ranges: what is installed is inside them, one clear line when it is not, and
the transformers internals the engine uses are all there (engine/compat.py)."""

from __future__ import annotations

import logging
from importlib import metadata

import pytest

from autocaption import dependencies
from autocaption.dependencies import DependencyError


def test_the_installed_versions_are_inside_the_declared_ranges() -> None:
    ranges = dependencies.declared()
    assert {"torch", "transformers", "pillow", "watchdog", "pyyaml", "piexif", "click", "defusedxml"} <= set(ranges)
    assert dependencies.findings() == [], [finding.line() for finding in dependencies.findings()]


def test_the_transformers_internals_the_engine_uses_are_all_there() -> None:
    from autocaption.engine import compat

    assert compat.problems() == [], f"transformers {compat.VERSION} changed: {compat.problems()}"


def pretend(monkeypatch: pytest.MonkeyPatch, name: str, version: str | None) -> None:
    real = metadata.version

    def version_of(package: str) -> str:
        if package != name:
            return real(package)
        if version is None:
            raise metadata.PackageNotFoundError(package)
        return version

    monkeypatch.setattr(dependencies.metadata, "version", version_of)


def test_an_older_transformers_is_one_line_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    pretend(monkeypatch, "transformers", "5.3.0")
    with pytest.raises(DependencyError) as info:
        dependencies.check()
    wanted = dependencies.findings()[0].range
    assert wanted.startswith("transformers>=5.") and ",<" in wanted
    assert str(info.value) == f"transformers 5.3.0 is installed; autocaption needs {wanted}: pip install '{wanted}'"


def test_a_missing_torch_names_the_index_of_its_build(monkeypatch: pytest.MonkeyPatch) -> None:
    pretend(monkeypatch, "torch", None)
    with pytest.raises(
        DependencyError,
        match=r"torch is not installed; autocaption needs torch>=2\.6,<3: pip install "
        r"'torch>=2\.6,<3' with the index of your build: --index-url https://download\.pytorch\.org/whl/rocm",
    ):
        dependencies.check()


def test_a_newer_release_than_tested_is_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pretend(monkeypatch, "transformers", "5.99.0")
    with caplog.at_level(logging.WARNING, logger="autocaption"):
        dependencies.check()
    assert "transformers 5.99.0 is installed, newer than autocaption is tested with" in caplog.text
