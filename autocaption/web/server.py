"""Serving the review page: waitress (a pure-Python, threaded WSGI server) on 127.0.0.1 unless told
otherwise, with an access token that is random per start unless `state.dir/web-token` holds one.

The first line on stdout is the URL to open, token included; the rest goes to the log.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from autocaption.config import Config
from autocaption.errors import ConfigError
from autocaption.journal import Journal
from autocaption.paths import display
from autocaption.review import Review

log = logging.getLogger("autocaption")

TOKEN_FILE = "web-token"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def token_for(state_dir: Path) -> str:
    """`state.dir/web-token` when it exists (it must be readable by its owner only), else a new random one."""
    path = state_dir / TOKEN_FILE
    try:
        st = path.stat()
    except FileNotFoundError:
        return secrets.token_urlsafe(32)
    if st.st_mode & 0o077:
        raise ConfigError(f"{display(path)}: other users can read it; chmod 600 {display(path)}")
    token = path.read_text(encoding="utf-8").strip()
    if len(token) < 16:
        raise ConfigError(f"{display(path)}: a token needs at least 16 characters")
    return token


def serve(config: Config, *, host: str, port: int, read_only: bool) -> int:
    from waitress import create_server  # imported here: `autocaption --help` stays instant

    from autocaption.web.app import create_app

    token = token_for(config.state.dir)
    # waitress warns "Task queue depth is 1" whenever a request waits for a thread at all: on a busy machine, the
    # first request before its threads are up. For one person's page that is no news worth a warning line.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    journal = Journal(config.state.dir, read_only=read_only)  # WAL: the daemon keeps writing meanwhile
    try:
        app = create_app(config, Review(config, journal), token, read_only=read_only)
        try:
            server = create_server(app, host=host, port=port, threads=8, ident="autocaption")
        except (OSError, ValueError) as exc:  # a name that does not resolve (ValueError), a port in use...
            reason = getattr(exc, "strerror", None) or exc
            raise ConfigError(f"web: cannot listen on {host}:{port}: {reason}") from None
        shown = f"[{host}]" if ":" in host else host
        print(f"http://{shown}:{server.effective_port}/?token={token}", flush=True)  # the URL to open
        if host not in LOOPBACK:
            log.warning("listening on %s: anyone who can reach it and has the token can edit captions", host)
        _stop_on_signals(server.close)
        with contextlib.suppress(OSError):  # closed by a signal while waiting in select()
            server.run()
    finally:
        journal.close()
    return 0


def _stop_on_signals(stop: Callable[[], None]) -> None:
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("stopping the review page")
        stop()
        sys.exit(0)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
