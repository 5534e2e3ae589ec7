from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from autocaption.config import DEFAULT_MODEL, load, parse
from autocaption.errors import ConfigError
from tests.conftest import ROOT, RunCli

SOURCE = Path("/etc/autocaption/rules.yaml")


def error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text, SOURCE)
    return str(info.value)


def test_minimal_config_gets_defaults() -> None:
    config = parse("rules: [{name: c, prompt: Describe.}]", SOURCE)
    assert config.model.id == DEFAULT_MODEL
    assert config.model.batch_size is None  # auto
    assert parse("model: {batch_size: auto}\nrules: [{name: c, prompt: x}]", SOURCE).model.batch_size is None
    assert parse("model: {batch_size: 6}\nrules: [{name: c, prompt: x}]", SOURCE).model.batch_size == 6
    assert (config.model.device, config.model.dtype) == ("auto", "auto")
    assert config.rules[0].max_new_tokens == 200
    assert config.rules[0].match.matches("a/b/IMG_1.JPG")


def test_missing_prompt_names_file_line_and_key_path() -> None:
    text = "rules:\n  - {name: a, prompt: x}\n  - {name: b, prompt: y}\n  - name: c\n    max_new_tokens: 5\n"
    assert error(text) == f"{SOURCE}:4: rules[2].prompt: required"


def test_unknown_key_is_an_error_with_its_path_and_the_known_keys() -> None:
    message = error("model:\n  id: x\n  batchsize: 4\nrules: [{name: a, prompt: b}]\n")
    assert message.startswith(f"{SOURCE}:3: model.batchsize: unknown key (known: ")
    assert "batch_size" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model: {batch_size: 0}\nrules: [{name: a, prompt: b}]", "model.batch_size: must be between 1 and 256"),
        ("model: {batch_size: four}\nrules: [{name: a, prompt: b}]", "model.batch_size: expected a whole number (1 to"),
        ("model: {device: tpu}\nrules: [{name: a, prompt: b}]", "model.device: must be one of auto, cpu, cuda"),
        ("model: {dtype: int8}\nrules: [{name: a, prompt: b}]", "model.dtype: must be one of"),
        ("rules: []", "rules: at least one rule is needed"),
        ("rules: [{name: a, prompt: b}, {name: a, prompt: c}]", "rules[1]: name 'a' is used by an earlier rule"),
        ("rules: [{name: 'a b', prompt: c}]", "rules[0].name: use letters, digits"),
        ("rules: [{name: a, prompt: '{filename}'}]", "rules[0].prompt: unknown placeholder {filename}"),
        ("rules: [{name: a, prompt: '{file.__class__}'}]", "rules[0].prompt: unknown placeholder"),
        ("rules: [{name: a, prompt: 'x {'}]", "rules[0].prompt: unmatched '{'"),
        ("rules: [{name: a, prompt: b, match: ['/abs/*.jpg']}]", "rules[0].match[0]: patterns are relative"),
        ("watch: [{recursive: true}]\nrules: [{name: a, prompt: b}]", "watch[0].path: required"),
        ("rules: [{name: a, prompt: '   '}]", "rules[0].prompt: must not be empty"),
        ("rules: {name: a}", "rules: expected a list"),
        ("rules: [{name: a, prompt: b, max_new_tokens: true}]", "expected a whole number"),
        ("", "the file is empty"),
        # issue 20: write targets, languages, output.location
        (
            "rules: [{name: a, prompt: b, write: [caption]}]",
            "rules[0].write[0]: must be one of description, keywords, title, alt_text, extended_description",
        ),
        (
            "rules: [{name: a, prompt: b, write: [title], language: German}]",
            "rules[0].language: must be a language tag such as de, fr or pt-BR; got 'German'",
        ),
        ("rules: [{name: a, prompt: b, write: [title], language: x-default}]", "rules[0].language: must be a language"),
        (
            "rules: [{name: a, prompt: b, write: [keywords], language: de}]",
            "rules[0].language: names the language alternative a text is written as; this rule writes no description",
        ),
        ("output: {location: maybe}\nrules: [{name: a, prompt: b}]", "output.location: expected true or false"),
        ("rules: [", "not valid YAML"),
        # issue 17.16: a number is not a model, and an empty value is not the default
        ("model: {id: 5}\nrules: [{name: a, prompt: b}]", "model.id: expected a hub id or a model folder, got the"),
        ("model: {compile: null}\nrules: [{name: a, prompt: b}]", "model.compile: has no value; leave the key out"),
        ("model: {batch_size: null}\nrules: [{name: a, prompt: b}]", "model.batch_size: has no value"),
        (
            "model: {engine: openai, base_url: 'http://h/v1', api_key_file: /no/such/key}\n"
            "rules: [{name: a, prompt: b}]",
            "model.api_key_file: no such file: /no/such/key",
        ),
    ],
)
def test_invalid_configs_are_rejected_clearly(text: str, expected: str) -> None:
    message = error(text)
    assert message.startswith(str(SOURCE))
    assert expected in message


def test_config_objects_are_immutable() -> None:
    config = parse("rules: [{name: a, prompt: b}]", SOURCE)
    with pytest.raises(AttributeError):
        config.rules[0].name = "other"  # type: ignore[misc]


def test_relative_paths_are_taken_from_the_config_folder() -> None:
    config = parse("watch: [{path: photos}]\nstate: {dir: state}\nrules: [{name: a, prompt: b}]", SOURCE)
    assert config.watch[0].path == Path("/etc/autocaption/photos")
    assert config.state.dir == Path("/etc/autocaption/state")


def test_rules_select_by_match_patterns() -> None:
    config = parse("rules:\n - {name: all, prompt: a}\n - {name: scans, prompt: b, match: ['**/scans/**']}\n", SOURCE)
    assert [r.name for r in config.rules_for("2024/IMG_1.jpg")] == ["all"]
    assert [r.name for r in config.rules_for("family/scans/1970/p1.tif")] == ["all", "scans"]


def test_fingerprint_changes_with_the_prompt_only() -> None:
    a = parse("rules: [{name: a, prompt: one}]", SOURCE).rules[0]
    b = parse("rules: [{name: a, prompt: one, match: ['**/*.jpg']}]", SOURCE).rules[0]
    c = parse("rules: [{name: a, prompt: two}]", SOURCE).rules[0]
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="configuration file not found"):
        load(tmp_path / "nope.yaml")


def test_example_config_is_valid() -> None:
    config = load(ROOT / "config" / "rules.yaml")
    assert config.model.id == DEFAULT_MODEL
    assert {r.name for r in config.rules} >= {"caption", "keywords"}


def test_check_command_validates_without_importing_torch(run_cli: RunCli) -> None:
    result = run_cli("check", "--config", ROOT / "config" / "rules.yaml")
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "rule caption" in result.stdout
    probe = subprocess.run(
        [sys.executable, "-c",
         "import sys; from autocaption.cli import cli\n"
         "try:\n  cli.main(['check', '--config', 'config/rules.yaml'])\nexcept SystemExit: pass\n"
         "print('torch' in sys.modules, 'transformers' in sys.modules)"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    assert probe.stdout.strip().endswith("False False")


def test_check_command_reports_errors_in_one_line_with_exit_2(run_cli: RunCli, tmp_path: Path) -> None:
    bad = tmp_path / "rules.yaml"
    bad.write_text("rules:\n  - name: a\n", encoding="utf-8")
    result = run_cli("check", "--config", bad)
    assert result.returncode == 2
    assert result.stderr.strip() == f"autocaption: error: {bad}:2: rules[0].prompt: required"


def test_watch_paths_are_resolved_so_every_photo_has_one_spelling(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    config = parse("watch: [{path: link}]\nrules: [{name: a, prompt: b}]", tmp_path / "rules.yaml")
    assert config.watch[0].path == real


def test_an_unset_variable_in_a_path_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTOCAPTION_NO_SUCH_VAR", raising=False)
    monkeypatch.setenv("AUTOCAPTION_PHOTOS", "/srv/photos")
    text = "watch: [{path: '${AUTOCAPTION_NO_SUCH_VAR}/inbox'}]\nrules: [{name: a, prompt: b}]\n"
    assert error(text) == (
        f"{SOURCE}:1: watch[0].path: environment variable $AUTOCAPTION_NO_SUCH_VAR is not set "
        "(in '${AUTOCAPTION_NO_SUCH_VAR}/inbox')"
    )
    state = "state: {dir: $AUTOCAPTION_NO_SUCH_VAR}\nrules: [{name: a, prompt: b}]"
    assert "state.dir: environment variable $AUTOCAPTION_NO_SUCH_VAR is not set" in error(state)
    config = parse("watch: [{path: '$AUTOCAPTION_PHOTOS/inbox'}]\nrules: [{name: a, prompt: b}]\n", SOURCE)
    assert config.watch[0].path == Path("/srv/photos/inbox")
    assert [p.written for p in config.user_paths] == ["$AUTOCAPTION_PHOTOS/inbox"]


def test_a_top_level_list_names_the_file_and_line() -> None:
    assert error("- {name: a, prompt: b}\n") == (
        f"{SOURCE}:1: the file must be a mapping of settings with at least `rules:`, not a list"
    )
    assert error("just text\n").endswith("not a single value")
