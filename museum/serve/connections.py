"""Connection-level bounds for uvicorn: slow or idle clients are closed, many clients can connect.

uvicorn's own `limit_concurrency` counts every open connection, idle keep-alive and half-sent
ones included, so a few dozen slow sockets lock everybody out. Instead each connection gets a
deadline while the server waits on the client (a request head, or the rest of a body it has
already answered) and is closed when it passes; inference is bounded separately, by the queue
in `limits.InferenceGate`, where only requests that are fully read wait.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from museum.log import logger

# Larger than any burst we expect; Linux caps it at net.core.somaxconn (4096 by default).
BACKLOG = 4096
# Enough descriptors for thousands of connections (each costs one), well under typical hard limits.
WANT_OPEN_FILES = 65536

_TIMEOUT_BODY = json.dumps({"detail": "request head not received in time; send the whole request at once"}).encode()
REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                   b"content-length: " + str(len(_TIMEOUT_BODY)).encode() + b"\r\n\r\n" + _TIMEOUT_BODY)


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with one more rule: while the server waits on the client, a deadline runs.

    The deadline starts when the connection opens or a response ends, and is not pushed back by
    further bytes (a client sending one byte a second would otherwise hold its socket forever).
    It stops once a request head is complete. When it passes, an idle connection is closed
    silently (as after keep-alive) and a half-sent one gets a 408 first.
    """

    head_timeout_s = 5.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def _waiting_on_client(self) -> bool:
        # Server IDLE: no request yet; DONE: answered, the client may still owe the rest of its body.
        return (self.conn.our_state in (h11.IDLE, h11.DONE) and self.conn.their_state in (h11.IDLE, h11.SEND_BODY)
                and not self.transport.is_closing())

    def _watch(self) -> None:
        if not self._waiting_on_client():
            self._stop_timer()
        elif self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._timed_out)

    def _stop_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _timed_out(self) -> None:
        self._head_timer = None
        if not self._waiting_on_client():
            return
        if self.conn.our_state is h11.IDLE and self.conn.trailing_data[0]:
            self.transport.write(REQUEST_TIMEOUT)  # part of a head arrived: say why we hang up
        self.transport.close()


def head_timeout_protocol(seconds: float) -> type[HeadTimeoutProtocol]:
    """The protocol class to pass as uvicorn's `http=`, with this server's deadline."""
    return type("HeadTimeoutProtocol", (HeadTimeoutProtocol,), {"head_timeout_s": seconds})


def raise_open_files_limit(want: int = WANT_OPEN_FILES) -> int:
    """Raise this process's soft limit on open files toward the hard one; returns the soft limit now in force."""
    try:
        import resource
    except ImportError:  # Windows: no such limit to raise
        return want
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logger.warning(f"could not raise the open-files limit from {soft} to {target} ({exc})")
    if soft != resource.RLIM_INFINITY and soft < 1100:
        logger.warning(f"open-files limit {soft}: fewer than 1,000 simultaneous connections can be accepted; "
                       "raise it with `ulimit -n`")
    return soft
