"""Request bounds: an ASGI middleware for body size, wall time and safe response headers, and the
bounded queue in front of inference.

Sizes are checked twice: against `Content-Length` before anything is read, and while the
body streams in (a client may send no length, or lie about it). Starlette's form parser
spools uploads to disk, so without the streaming check a huge upload would fill the disk
before any handler could refuse it.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

MB = 1024 * 1024

# The page loads nothing from elsewhere; inline style attributes draw the bars when JS is off.
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


@dataclass(frozen=True)
class Limits:
    """Request bounds; `csv_bytes` applies to `POST /submit`, `upload_bytes` to every other request.

    Each expert has its own queue of predictions (a photo's request never waits behind the
    description-only ones, nor they behind it); `queue` may wait in each, beyond that
    `/predict` answers 503. `jobs` submissions (uploading, queued or running) and `jobs_bytes`
    of their CSVs may be pending; beyond that `/submit` answers 503 (one upload alone is always
    let in: `csv_bytes` bounds it). A connection whose request head is not complete `head_timeout_s` after it opened
    (or after its last answer) is closed.
    """

    upload_bytes: int = 12 * MB
    csv_bytes: int = 50 * MB
    timeout_s: float = 30.0
    queue: int = 32
    jobs: int = 4
    jobs_bytes: int = 100 * MB
    head_timeout_s: float = 5.0


class Busy(Exception):
    """The server is full; the client should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


async def json_reply(send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    """A `{"detail": message}` response sent straight through ASGI (for answers given before the app runs)."""
    body = json.dumps({"detail": message}, ensure_ascii=False).encode("utf-8")
    extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()), *extra, *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": body})


class InferenceGate:
    """At most `workers` calls run at once, in threads off the event loop; at most `queue` wait for a turn.

    A call beyond that raises `Busy` at once instead of waiting without bound, and so does one
    whose expected wait passes `max_wait_s` (it would only time out in the queue). A slot is
    freed when its thread ends, not when the request gives up (a timed-out request does not
    let a new call start while its thread still computes).
    """

    def __init__(self, workers: int, queue: int, max_wait_s: float = 10.0, name: str = ""):
        self.workers, self.queue, self.max_wait_s, self.name = workers, queue, max_wait_s, name
        self.running = self.waiting = 0
        self.seconds_per_call = 0.1  # running mean, for Retry-After
        self._slots: asyncio.Semaphore | None = None  # made in the server's event loop, on first use
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"museum-predict-{name}")

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained, 1 to 60."""
        backlog = (self.running + self.waiting) * self.seconds_per_call / self.workers
        return min(60, max(1, math.ceil(backlog)))

    def full(self) -> bool:
        """No free slot and no room to wait."""
        if self.running < self.workers:
            return False
        return self.waiting >= self.queue or (self.waiting + 1) * self.seconds_per_call / self.workers > self.max_wait_s

    def busy(self) -> Busy:
        what = f"{self.name} prediction(s)" if self.name else "prediction(s)"
        return Busy(f"server busy: {self.running} {what} running and {self.waiting} waiting; retry in a few seconds",
                    self.retry_after())

    def check(self) -> None:
        """`Busy` when full."""
        if self.full():
            raise self.busy()

    async def run(self, fn, *args):
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.workers)
        self.check()
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            future = asyncio.get_running_loop().run_in_executor(self._pool, self._timed, fn, *args)
        except RuntimeError:  # the pool is shut down: the server is stopping
            self.running -= 1
            self._slots.release()
            raise Busy("the server is stopping; retry once it is back", 10) from None
        future.add_done_callback(self._free)
        # shield: a request that times out stops waiting, the computation (and its slot) goes on.
        return await asyncio.shield(future)

    def _timed(self, fn, *args):
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds_per_call = 0.8 * self.seconds_per_call + 0.2 * (time.perf_counter() - start)

    def _free(self, future: asyncio.Future) -> None:
        self.running -= 1
        self._slots.release()
        if not future.cancelled():
            future.exception()  # retrieved here too, so an abandoned call's error is not logged as "never retrieved"

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class GuardMiddleware:
    """Refuse oversized bodies with 413 and slow requests with 504; add security headers."""

    def __init__(self, app, limits: Limits):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limits.csv_bytes if scope["path"] == "/submit" else self.limits.upload_bytes
        too_big = f"request body over {limit // MB} MB; send a smaller file"
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await json_reply(send, 413, too_big)
        state = {"received": 0, "over": False, "started": False}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    # Pretend the client left: the app stops reading, and we answer 413 ourselves.
                    state["over"] = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if state["over"]:
                return  # the app's own reply to the cut-off body is replaced by the 413
            if message["type"] == "http.response.start":
                state["started"] = True
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, limited_receive, guarded_send), self.limits.timeout_s)
        except asyncio.TimeoutError:
            if not state["started"]:
                await json_reply(send, 504, f"request took longer than {self.limits.timeout_s:g} s; try a smaller file or retry")
            return
        except Exception:
            if not state["over"]:
                raise
        if state["over"] and not state["started"]:
            await json_reply(send, 413, too_big)
