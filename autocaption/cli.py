"""The command line. Each command parses its options and calls one function; errors become exit
codes in `main`, the one place that does so."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from autocaption import __version__, log
from autocaption.config import Config, load
from autocaption.errors import AutocaptionError, ExitCode

logger = logging.getLogger("autocaption")

config_option = click.option(
    "--config",
    "-c",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="AUTOCAPTION_CONFIG",
    required=True,
    help="The rules file (YAML). Also $AUTOCAPTION_CONFIG.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="autocaption")
@click.option("-v", "--verbose", count=True, help="More detail (-vv: library logs too).")
@click.option("-q", "--quiet", is_flag=True, help="Errors and the summary only.")
def cli(verbose: int, quiet: bool) -> None:
    """Describe photos with a local vision-language model (LLaVA-NeXT)."""
    log.setup(-1 if quiet else verbose)


@cli.command()
@config_option
def check(config_path: Path) -> None:
    """Validate the configuration without loading the model."""
    click.echo(describe_config(load(config_path)))


@cli.command()
@config_option
@click.option("--force", is_flag=True, help="Describe again even if the sidecar already has current answers.")
@click.option("--dry-run", is_flag=True, help="Run the model and print what would be written; touch nothing.")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
def process(config_path: Path, force: bool, dry_run: bool, paths: tuple[Path, ...]) -> None:
    """Describe every image under PATHS (files or folders) once, then exit."""
    from autocaption.process import process as run  # keeps `--help` instant: no torch import

    summary = run(load(config_path), paths, force=force, dry_run=dry_run)
    for plan in summary.planned:
        click.echo(plan)
    click.echo(summary.line())
    if summary.failures:
        raise SystemExit(ExitCode.FAILURES)


def describe_config(config: Config) -> str:
    lines = [f"{config.source}: OK"]
    lines.append(f"  model: {config.model.id} (device {config.model.device}, dtype {config.model.dtype}, "
                 f"batch {config.model.batch_size})")  # fmt: skip
    for watch in config.watch:
        note = "" if watch.path.is_dir() else "  (folder does not exist yet)"
        lines.append(f"  watch: {watch.path}{' (recursive)' if watch.recursive else ''}{note}")
    lines.append(f"  state: {config.state.dir}")
    for rule in config.rules:
        lines.append(f"  rule {rule.name}: {', '.join(rule.match.patterns)} -> up to {rule.max_new_tokens} tokens")
    return "\n".join(lines)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except AutocaptionError as exc:
        click.echo(f"autocaption: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(ExitCode.INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(ExitCode.SETUP)
    except KeyboardInterrupt:
        click.echo("autocaption: interrupted", err=True)
        sys.exit(ExitCode.INTERRUPTED)
