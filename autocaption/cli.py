"""The command line. Each command parses its options and calls one function; errors become exit
codes in `main`, the one place that does so."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from autocaption import __version__, log
from autocaption.config import WRITE_TARGETS, Config, load
from autocaption.errors import AutocaptionError, ConfigError, ExitCode
from autocaption.plural import counted
from autocaption.structure import describe_structure

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
@click.option("--stale", is_flag=True, help="Only images described by other rules or another model (journal).")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
def process(config_path: Path, force: bool, dry_run: bool, stale: bool, paths: tuple[Path, ...]) -> None:
    """Describe every image under PATHS (files or folders) once, then exit.

    With --stale, PATHS default to the watched folders."""
    from autocaption.process import process as run  # keeps `--help` instant: no torch import

    if not paths and not stale:
        raise click.UsageError("give at least one PATH (or --stale)")
    summary = run(load(config_path), paths, force=force, dry_run=dry_run, stale=stale)
    for plan in summary.planned:
        click.echo(plan)
    if summary.stages:
        logger.debug("%s", summary.stages_line())
    click.echo(summary.line())
    if summary.stopped:
        click.echo(f"autocaption: error: {summary.stopped}", err=True)
        raise SystemExit(ExitCode.SETUP)
    if summary.failures:
        raise SystemExit(ExitCode.FAILURES)


@cli.command()
@config_option
def run(config_path: Path) -> None:
    """Run the daemon: watch the configured folders and describe every new photo."""
    from autocaption.service import run as run_service  # keeps `--help` instant: no torch import

    raise SystemExit(run_service(config_path))


@cli.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for monitoring.")
def status(config_path: Path, as_json: bool) -> None:
    """Queue depth, rate and recent errors, from the journal (the daemon need not be running)."""
    config = load(config_path)
    if not as_json:
        click.echo(format_status(status_report(config)))
        return
    try:
        report = status_report(config)
    except AutocaptionError as exc:  # a monitor reads JSON: the reason, and still exit 2
        click.echo(json.dumps({"error": str(exc)}, ensure_ascii=False))
        raise SystemExit(exc.exit_code) from None
    click.echo(json.dumps(report, ensure_ascii=False))


@cli.command()
@config_option
def rebuild(config_path: Path) -> None:
    """A new journal from the photos' sidecars (a lost or damaged one is set aside, never deleted)."""
    from autocaption.rebuild import rebuild as refill

    click.echo(refill(load(config_path)).line())


@cli.command()
@config_option
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
def retry(config_path: Path, paths: tuple[Path, ...]) -> None:
    """Queue failed images again (all, or those at or under PATHS); a running daemon picks them up."""
    count, problems = retry_failed(load(config_path), paths)
    for problem in problems:
        click.echo(f"autocaption: error: {problem}", err=True)
    click.echo(f"{counted(count, 'image')} queued again")
    if problems:
        raise SystemExit(ExitCode.FAILURES)


@cli.command()
@click.option(
    "--config",
    "-c",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="AUTOCAPTION_CONFIG",
    help="The rules file, for its model, state dir and folders (default: the default model and state dir).",
)
def doctor(config_path: Path | None) -> None:
    """Check this machine: torch build, GPUs, ROCm access, attention kernels, model, state dir, limits, unit."""
    from autocaption.doctor import run as examine  # imports torch: only here

    found, code = examine(load(config_path) if config_path else None)
    for check in found:
        click.echo(check.line())
    raise SystemExit(code)


@cli.command()
@config_option
@click.argument("query", default="")
@click.option("--rule", default="", help="Only this rule's answers.")
@click.option(
    "--where",
    "where",
    multiple=True,
    metavar="RULE=ANSWER",
    help="Only photos whose choice or list rule answered this (blurry=yes, keywords=beach); repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="JSON, for scripts.")
def search(config_path: Path, query: str, rule: str, where: tuple[str, ...], as_json: bool) -> None:
    """Search the answers (every word, best match first); exit 1 when nothing matches."""
    from autocaption.catalog import render_hits
    from autocaption.catalog import search as find

    if not query.strip() and not where:
        raise click.UsageError("give words to search for, or --where RULE=ANSWER, or both")
    hits = find(load(config_path), query, rule=rule, where=where)
    if hits or as_json:
        click.echo(render_hits(hits, as_json=as_json, bold=sys.stdout.isatty()))
    if not hits:
        if not as_json:
            asked = " and ".join([repr(query)] * bool(query.strip()) + list(where))
            click.echo(f"autocaption: nothing matches {asked}", err=True)
        raise SystemExit(ExitCode.FAILURES)


@cli.command()
@config_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (others: a warning).")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535), help="0: any free port.")
@click.option("--read-only", is_flag=True, help="Look and search only: every change is refused.")
def web(config_path: Path, host: str, port: int, read_only: bool) -> None:
    """A local page to look at the captions, search them and correct them. Prints the URL to open."""
    from autocaption.web.server import serve

    raise SystemExit(serve(load(config_path), host=host, port=port, read_only=read_only))


@cli.group()
def service() -> None:
    """Install autocaption as a systemd service."""


@service.command("install")
@config_option
@click.option("--user", "user_unit", is_flag=True, help="A user unit (~/.config/systemd/user) instead of a system one.")
@click.option("--unit-dir", type=click.Path(path_type=Path, file_okay=False), help="Write the unit here instead.")
@click.option("--run-as", default="autocaption", show_default=True, help="User= of the system unit.")
def service_install(config_path: Path, user_unit: bool, unit_dir: Path | None, run_as: str) -> None:
    """Render the unit for this config's folders, write it, and print the next commands."""
    from autocaption.unit import install

    click.echo(install(load(config_path), user=user_unit, unit_dir=unit_dir, run_as=run_as))


def status_report(config: Config) -> dict[str, Any]:
    """What `status` says, as data: the journal's counts and whether a daemon holds the state dir."""
    from autocaption.journal import Journal
    from autocaption.locks import POLLED_FILE, SERVERS_FILE, DaemonLock

    journal = Journal(config.state.dir, read_only=True)  # works on a state dir this user cannot write
    try:
        stats = journal.stats()
    finally:
        journal.close()
    pid = DaemonLock(config.state.dir).holder()
    return {
        "journal": str(journal.path),
        "daemon": {"running": pid is not None, "pid": pid or None},
        "waiting": _waiting(config, pid is not None),
        "polled": _said(config, POLLED_FILE, pid is not None),
        "servers": _said(config, SERVERS_FILE, pid is not None),
        "queued": stats.queued,
        "retrying": stats.retrying,
        "done": stats.done,
        "failed": stats.failed,
        "per_hour": stats.per_hour,
        "recent_errors": [{"path": path, "error": error} for path, error in stats.recent_errors],
    }


def _waiting(config: Config, running: bool) -> str | None:
    """Why a running daemon cannot go on: what it said it waits for (the server, space), or a state.dir
    without space for the journal's writes (where it may not even be able to say so)."""
    import shutil

    from autocaption.locks import WAITING_FILE

    try:
        free = shutil.disk_usage(config.state.dir).free
    except OSError:
        free = 1 << 30
    if free < 1 << 20:
        return f"state.dir {config.state.dir} is full ({free} bytes free): the daemon waits for space"
    return _said(config, WAITING_FILE, running)


def _said(config: Config, name: str, running: bool) -> str | None:
    """What a running daemon left in state.dir/`name` for other processes to show."""
    from autocaption.locks import daemon_note

    return daemon_note(config.state.dir, name) if running else None


def format_status(report: dict[str, Any]) -> str:
    daemon = report["daemon"]
    running = f"running (pid {daemon['pid']})" if daemon["pid"] else "running"
    lines = [
        f"daemon: {running if daemon['running'] else 'not running'}",
        f"queued: {report['queued']}  retrying: {report['retrying']}  done: {report['done']}  "
        f"failed: {report['failed']}",
        f"rate: {report['per_hour']} images in the last hour",
    ]
    if report.get("waiting"):
        lines.append(f"waiting: {report['waiting']}")
    if report.get("polled"):
        lines.append(f"watch: {report['polled']}")
    if report.get("servers"):
        lines.append(f"servers: {report['servers']}")
    if report["recent_errors"]:
        lines.append("recent errors:")
        lines.extend(f"  {entry['error']}" for entry in report["recent_errors"])
    return "\n".join(lines)


def retry_failed(config: Config, paths: Sequence[Path]) -> tuple[int, list[str]]:
    """Queue failed images again: all of them, or those at or under `paths`; (count, one line per path that
    matched none)."""
    from autocaption.journal import Journal

    if not Journal.exists(config.state.dir):  # nothing has failed yet: and no journal is made to say so
        raise ConfigError(f"state.dir: {config.state.dir}: no journal yet (neither the daemon nor process has run)")
    journal = Journal(config.state.dir)
    try:
        if not paths:
            return journal.retry(), []
        count, problems = 0, []
        for path in paths:
            queued, problem = journal.retry_at(path)
            count += queued
            if problem:
                problems.append(problem)
        return count, problems
    finally:
        journal.close()


def describe_config(config: Config) -> str:
    lines = [f"{config.source}: OK"]
    lines.append(f"  model: {config.model.id} (device {config.model.device}, dtype {config.model.dtype}, "
                 f"batch {config.model.batch_size or 'auto'})")  # fmt: skip
    for watch in config.watch:
        note = "" if watch.path.is_dir() else "  (folder does not exist yet)"
        lines.append(f"  watch: {watch.path}{' (recursive)' if watch.recursive else ''}{note}")
    lines.append(f"  state: {config.state.dir}")
    for rule in config.rules:
        answer = f"up to {rule.max_new_tokens} tokens" + (
            f", {describe_structure(rule.structure)}" if rule.structure else ""
        )
        gate = f" (only when {rule.when.describe()})" if rule.when else ""
        targets = ", ".join(target for target in WRITE_TARGETS if target in rule.write)
        written = f"; writes {targets}" + (f" ({rule.language})" if rule.language else "") if targets else ""
        lines.append(f"  rule {rule.name}: {', '.join(rule.match.patterns)} -> {answer}{gate}{written}")
    if config.output.location:
        lines.append("  output: the place named from GPS into photos without a location (output.location)")
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
