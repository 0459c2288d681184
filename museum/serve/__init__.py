"""`museum serve`: a web page and a JSON API over the trained experts, for curators.

Modules: `service` (one item through the cascade, thread-safe), `jobs` (CSV submissions
in the background, a bounded queue), `limits` (body size, timeout, headers, the bounded queue
in front of inference), `forms` (strict UTF-8 form fields), `connections` (slow and idle
connections closed, open-files limit), `page` (HTML templates in `static/`), `app` (the
FastAPI routes).
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
from pathlib import Path

from museum.errors import MuseumError
from museum.log import logger
from museum.serve.app import create_app
from museum.serve.limits import Limits

__all__ = ["Limits", "create_app", "run_server"]


def run_server(text_dir: Path | None, image_dir: Path | None, host: str = "127.0.0.1", port: int = 8000,
               device: str = "auto", settings_file: Path | None = None, limits: Limits = Limits(),
               access_log: bool = True) -> None:
    """Load the models once and serve until Ctrl-C."""
    import uvicorn

    from museum.serve.connections import BACKLOG, head_timeout_protocol, raise_open_files_limit

    _check_port_free(host, port)  # before loading the models, not after uvicorn's multi-line error
    app = create_app(text_dir, image_dir, device, settings_file, limits)
    if not _is_loopback(host):
        logger.warning(f"--host {host}: the server is reachable from other machines; it has no login")
    raise_open_files_limit()  # one descriptor per connection: let a thousand in
    logger.info(f"serving on http://{host}:{port} (Ctrl-C stops)")
    # No limit_concurrency: it counts idle and half-sent connections too, so slow clients locked
    # everybody out. Slow clients are cut by the head deadline; work is bounded by the queues.
    try:
        uvicorn.run(app, host=host, port=port, log_level="info" if access_log else "warning", access_log=access_log,
                    http=head_timeout_protocol(limits.head_timeout_s), backlog=BACKLOG,
                    timeout_keep_alive=5, timeout_graceful_shutdown=5)
    finally:
        # A second Ctrl-C skips the app's own shutdown: stop the job and remove its files here too.
        app.state.jobs.close()
        shutil.rmtree(app.state.workdir, ignore_errors=True)


def _check_port_free(host: str, port: int) -> None:
    """A one-line error when `host:port` cannot be bound (in use, or not an address of this machine)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise MuseumError(f"--host {host}: not an address or name this machine knows") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind(address)
        except OSError as exc:
            raise MuseumError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror}); "
                              "pick another --port or stop what holds it") from None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
