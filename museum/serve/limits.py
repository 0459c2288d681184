"""An ASGI middleware that bounds every request: body size, wall time, and safe response headers.

Sizes are checked twice: against `Content-Length` before anything is read, and while the
body streams in (a client may send no length, or lie about it). Starlette's form parser
spools uploads to disk, so without the streaming check a huge upload would fill the disk
before any handler could refuse it.
"""

from __future__ import annotations

import asyncio
import json
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
    """Request bounds; `csv_bytes` applies to `POST /submit`, `upload_bytes` to every other request."""

    upload_bytes: int = 12 * MB
    csv_bytes: int = 50 * MB
    timeout_s: float = 30.0


async def _reply(send, status: int, message: str) -> None:
    body = json.dumps({"detail": message}, ensure_ascii=False).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()), *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": body})


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
            return await _reply(send, 413, too_big)
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
                await _reply(send, 504, f"request took longer than {self.limits.timeout_s:g} s; try a smaller file or retry")
            return
        except Exception:
            if not state["over"]:
                raise
        if state["over"] and not state["started"]:
            await _reply(send, 413, too_big)
