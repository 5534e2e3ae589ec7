"""Several inference servers behind one remote engine: which server a photo's requests go to, and which
servers are up.

Every request of one photo goes to the same server, so that a server caching prefixes by the image (vLLM
hashes the image into its prefix cache) computes each photo's vision tower and prefill once. The server is
chosen by rendezvous hashing of the photo's content: each server scores hash(server, photo) and the highest
score wins. Adding or removing a server moves only the photos that rank it first (1/N of them), and a photo
whose server is down goes to its second choice, the same one every time.

A server that fails (refused, timed out, busy, a model it does not serve) is taken out for a back-off
period (`BACKOFF_SECONDS` to `MAX_BACKOFF_SECONDS`). The requests that fail together in one outage count
once. When the period is over the server is probed (its model list, in the background) before photos go
to it again. A probe's answer takes it back on trial: its back-off is forgotten only when it answers a
photo, so a server whose model list answers while its chat hangs (a wedged engine behind a live API) is
out twice as long each time. While every server is out, requests still go to them, in the photo's order:
then nothing is lost, and the daemon waits for a server as it does for a single one.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

BACKOFF_SECONDS = 10.0
MAX_BACKOFF_SECONDS = 300.0


@dataclass
class Server:
    url: str
    slots: threading.BoundedSemaphore  # requests open at once on this server (`max_in_flight`)
    up: bool = True
    down_until: float = 0.0  # monotonic seconds: out until then
    backoff: float = 0.0  # the last back-off period (kept after a probe: 0 once it answers a photo)
    reason: str = ""  # why it is out
    probing: bool = False  # a probe is under way
    answered: float = field(default=-float("inf"))  # when it last answered


def score(url: str, key: bytes) -> bytes:
    """A server's rendezvous score for a photo (its content's key)."""
    return hashlib.blake2b(url.encode() + b"\x00" + key, digest_size=8).digest()


class ServerPool:
    """The servers, their state, and each photo's order of them."""

    def __init__(
        self, urls: Sequence[str], max_in_flight: int, probe: Callable[[str], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.servers = [Server(url, threading.BoundedSemaphore(max_in_flight)) for url in urls]
        self._probe = probe  # asks a server whether it answers (its model list)
        self._clock = clock
        self._lock = threading.Lock()

    def route(self, key: bytes) -> list[Server]:
        """The servers to try for a photo, in order: those up, by its rendezvous ranking; then those out (the
        soonest back first), so that a request has somewhere to go even when every server is out."""
        ranked = sorted(self.servers, key=lambda server: score(server.url, key), reverse=True)
        now = self._clock()
        with self._lock:
            for server in ranked if len(self.servers) > 1 else ():  # (one server: its requests probe it)
                if not server.up and now >= server.down_until and not server.probing:
                    server.probing = True
                    threading.Thread(target=self._check, args=(server,), name="probe", daemon=True).start()
            up = [server for server in ranked if server.up]
            out = sorted((server for server in ranked if not server.up), key=lambda server: server.down_until)
        return up + out

    def any_up(self, besides: set[str]) -> bool:
        """Whether a server other than these (by URL) is up."""
        with self._lock:
            return any(server.up for server in self.servers if server.url not in besides)

    def failed(self, server: Server, reason: str) -> None:
        """A request to `server` failed in a way that says it is down (or cannot serve now). The requests in
        flight when it went down fail too: they are the same outage, not more of them."""
        with self._lock:
            if not server.up:
                return
            self._take_out(server, reason)
            others = [other.url for other in self.servers if other.up]
        if len(self.servers) > 1:  # (one server: the engine's own messages say it)
            where = f"its photos go to {', '.join(others)}" if others else "no server is up: photos wait"
            log.warning("server %s is out for %.0f s: %s; %s", server.url, server.backoff, reason, where)

    def _take_out(self, server: Server, reason: str) -> None:
        server.up, server.reason = False, reason
        server.backoff = min(max(2 * server.backoff, BACKOFF_SECONDS), MAX_BACKOFF_SECONDS)
        server.down_until = self._clock() + server.backoff

    def answered(self, server: Server) -> None:
        """It answered a photo: up, and its back-off forgotten."""
        with self._lock:
            server.answered = self._clock()
            back = not server.up
            server.up, server.backoff, server.down_until, server.reason = True, 0.0, 0.0, ""
        if back and len(self.servers) > 1:
            log.warning("server %s answers again; photos go to it", server.url)

    def _check(self, server: Server) -> None:
        try:
            answers = self._probe(server.url)
        except Exception:  # noqa: BLE001 - a probe that breaks is a server that does not answer
            answers = False
        with self._lock:
            server.probing = False
            if not answers:  # still out, for twice as long
                self._take_out(server, server.reason or "it did not answer a probe")
                return
            server.up, server.reason = True, ""  # on trial: its back-off stays until it answers a photo
        log.warning("server %s answers again; photos go to it", server.url)

    def summary(self) -> str:
        """One line for `status` and the daemon's status: "1 of 2 servers up; out: URL (why)"."""
        states = self.states()
        out = [f"{url} ({why})" for url, up, why in states if not up]
        up = len(states) - len(out)
        return f"{up} of {len(states)} servers up" + (f"; out: {', '.join(out)}" if out else "")

    def states(self) -> list[tuple[str, bool, str]]:
        """(url, up, why out) of every server, for `status` and the log."""
        with self._lock:
            return [(server.url, server.up, server.reason) for server in self.servers]
