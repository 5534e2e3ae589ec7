"""Shared fixtures: the tiny local model (built once per session), the shared corpus, and helpers to
write configs and run the real CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

# One torch thread in every test process, xdist's workers and each command line the tests start (they inherit
# this): the tiny models gain nothing from more, and with four workers on two cores the idle OpenMP threads of
# each spin on the cores the others need. The structured, family and process tests took 238 s and 468 CPU-s
# with torch's default threads, 117 s and 229 CPU-s with one. Set before anything here imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.tinymodel import build_tiny

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not CORPUS.is_dir():
        pytest.fail(f"the shared corpus is missing at {CORPUS}; clone the project next to ../shared")
    return CORPUS


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("model") / "tiny-llava")


@pytest.fixture
def make_config(tmp_path: Path, tiny_model: Path) -> Callable[..., Path]:
    """Write a rules file for the tiny model; `rules` and `extra` are YAML text."""

    def make(
        rules: str | None = None, extra: str = "", model: str | None = None, model_line: str | None = None
    ) -> Path:
        rules = (
            rules
            or """
            - {name: caption, prompt: "Describe {file}.", max_new_tokens: 16}
            - {name: keywords, prompt: "Keywords for this photo.", max_new_tokens: 8}
        """
        )
        text = (
            f"model: {model_line or f'{{id: {model or str(tiny_model)!r}, batch_size: 4}}'}\n"
            f"state: {{dir: {str(tmp_path / 'state')!r}}}\n"
            f"{textwrap.dedent(extra)}\n"
            f"rules:\n{textwrap.indent(textwrap.dedent(rules).strip(), '  ')}\n"
        )
        path = tmp_path / "rules.yaml"
        path.write_text(text, encoding="utf-8")
        return path

    return make


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"  # this machine cannot reach the hub; fail fast rather than retry
    env.pop("AUTOCAPTION_CONFIG", None)
    return env


RunCli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def run_cli() -> RunCli:
    """Run the real `autocaption` command line in a subprocess."""

    def run(
        *args: str | Path, timeout: float = 300, env: dict[str, str | None] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`env`: variables to set for this run (None removes one)."""
        environment = cli_env()
        for name, value in (env or {}).items():
            if value is None:
                environment.pop(name, None)
            else:
                environment[name] = value
        return subprocess.run(
            [sys.executable, "-m", "autocaption", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=environment,
            check=False,
        )

    return run


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target
