"""Submission jobs: an uploaded CSV becomes a `guid,typology` file in the background, with progress.

The upload is validated (and its rows counted) before the job is queued, so a bad file is a
4xx at once. Jobs run one at a time through `museum.submit.submit`, with the server's
already loaded experts. Files live under the server's private work folder, in a folder
named by the job id the server generated: no path is ever built from user input.

The queue is bounded: an upload takes a place (`Ticket`) before its body is read, the job
keeps it until it ends, and when `max_jobs` places or `max_bytes` of CSV are taken, `reserve`
raises `Busy`. A finished job keeps only its submission.csv, for a while. Stopping the server
cancels the running job at its next chunk (one log line, no traceback) and the queued ones.
"""

from __future__ import annotations

import queue
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from museum.data.competition import iter_competition_chunks
from museum.errors import MuseumError
from museum.log import logger
from museum.serve.limits import MB, Busy
from museum.serve.service import InputError, Predictor
from museum.submit import submit

KEEP_JOBS = 20  # finished jobs kept for download; older ones are deleted
KEEP_SECONDS = 3600  # and none longer than an hour
RETRY_AFTER_S = 10  # a job takes seconds to minutes: a polite interval to try again
STOP_WAIT_S = 10.0  # how long stopping waits for the running job to reach its next chunk
CANCELLED = "cancelled: the server stopped; submit the CSV again"


class Cancelled(Exception):
    """Raised inside a running job when the server stops."""


@dataclass(eq=False)
class Ticket:
    """A place in the submission queue: `nbytes` of CSV, held from the upload's first byte to its job's end."""

    nbytes: int
    job: Job | None = None


@dataclass
class Job:
    """State of one submission job, as `GET /jobs/{id}` reports it."""

    id: str
    folder: Path
    rows_total: int
    rows_done: int = 0
    state: str = "queued"  # queued | running | done | error
    error: str = ""
    routes: dict = field(default_factory=dict)
    seconds: float = 0.0
    ended: float = 0.0  # time.monotonic() when it finished

    @property
    def upload(self) -> Path:
        return self.folder / "upload.csv"

    @property
    def out(self) -> Path:
        return self.folder / "submission.csv"

    def as_dict(self) -> dict:
        return {"id": self.id, "state": self.state, "rows_done": self.rows_done, "rows_total": self.rows_total,
                "error": self.error, "routes": self.routes, "seconds": round(self.seconds, 2),
                "download": f"/jobs/{self.id}/submission.csv" if self.state == "done" else None}


class Jobs:
    """A bounded queue of submission jobs over one worker thread (long files do not starve `/predict`)."""

    def __init__(self, predictor: Predictor, root: Path, max_jobs: int = 4, max_bytes: int = 100 * MB):
        self.predictor, self.root = predictor, root
        self.max_jobs, self.max_bytes = max_jobs, max_bytes
        self.jobs: dict[str, Job] = {}
        self.tickets: set[Ticket] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.queue: queue.SimpleQueue[tuple[Job, Ticket] | None] = queue.SimpleQueue()
        # A daemon thread: the interpreter never blocks on it at exit; `close` stops it first.
        self.worker = threading.Thread(target=self._work, name="museum-submit", daemon=True)
        self.worker.start()

    def reserve(self, nbytes: int) -> Ticket:
        """A place for an upload of up to `nbytes`, or `Busy` when the queue is full."""
        with self.lock:
            used = sum(t.nbytes for t in self.tickets)
            if self.stopping.is_set():
                raise Busy("the server is stopping; retry once it is back", RETRY_AFTER_S)
            if len(self.tickets) >= self.max_jobs or (self.tickets and used + nbytes > self.max_bytes):
                raise Busy(f"submission queue full ({len(self.tickets)} CSV(s), {used / MB:.1f} MB pending; "
                           f"limits {self.max_jobs} CSVs and {self.max_bytes / MB:.1f} MB); retry later", RETRY_AFTER_S)
            ticket = Ticket(nbytes)
            self.tickets.add(ticket)
            return ticket

    def end_upload(self, ticket: Ticket) -> None:
        """The upload's request is over: free its place unless it became a job (which frees it when it ends)."""
        if ticket.job is None:
            with self.lock:
                self.tickets.discard(ticket)

    def start(self, data: bytes, ticket: Ticket | None = None) -> Job:
        """Validate an uploaded CSV and queue it; a bad file raises `InputError` with a one-line reason."""
        ticket = ticket or self.reserve(len(data))
        job_id = uuid.uuid4().hex
        folder = self.root / job_id
        folder.mkdir(parents=True)
        upload = folder / "upload.csv"
        try:
            upload.write_bytes(data)
            total = sum(len(chunk) for chunk in iter_competition_chunks(upload, chunk_size=50_000))
        except BaseException as exc:
            shutil.rmtree(folder, ignore_errors=True)
            self._free(ticket)
            if isinstance(exc, MuseumError):
                # The reader names the file; the curator knows it as the CSV they uploaded, not our temp path.
                raise InputError(str(exc).replace(str(upload), "uploaded CSV")) from None
            raise
        job = Job(job_id, folder, total)
        with self.lock:
            ticket.nbytes, ticket.job = len(data), job
            self.tickets.add(ticket)  # again, in case its request gave up (timed out) while we validated
            self.jobs[job_id] = job
            self._forget_old()
        self.queue.put((job, ticket))
        return job

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            self._forget_old()
            return self.jobs.get(job_id)

    def _free(self, ticket: Ticket) -> None:
        with self.lock:
            self.tickets.discard(ticket)

    def _work(self) -> None:
        while (item := self.queue.get()) is not None:
            job, ticket = item
            if self.stopping.is_set():
                logger.warning(f"submission job {job.id} cancelled before it started: the server is stopping")
                state, error = "error", CANCELLED
            else:
                state, error = self._run(job)
            job.upload.unlink(missing_ok=True)  # only the submission is kept
            self._free(ticket)
            job.ended = time.monotonic()
            job.error, job.state = error, state  # last: a client that sees the end sees it cleaned up

    def _run(self, job: Job) -> tuple[str, str]:
        """Run one job; returns its final (state, error)."""
        job.state = "running"
        start = time.perf_counter()

        def progress(rows: int) -> None:
            job.rows_done = rows
            if self.stopping.is_set():
                raise Cancelled

        try:
            summary = submit(job.upload, job.out, setup=self.predictor.setup, progress=progress)
            job.routes = {route: n for route, n in summary.routes.items() if n}
            return "done", ""
        except MuseumError as exc:
            return "error", str(exc).replace(str(job.upload), "uploaded CSV")
        except Exception as exc:  # noqa: BLE001 - a job must end in a state the page can show
            if self.stopping.is_set():  # Cancelled, or its files removed under it at exit: no traceback
                logger.warning(f"submission job {job.id} cancelled at row {job.rows_done} of {job.rows_total}: "
                               "the server is stopping")
                return "error", CANCELLED
            logger.exception(f"submission job {job.id} failed")
            return "error", f"internal error ({type(exc).__name__}); see the server log"
        finally:
            job.seconds = time.perf_counter() - start

    def _forget_old(self) -> None:
        now = time.monotonic()
        finished = [j for j in self.jobs.values() if j.ended]
        for rank, job in enumerate(reversed(finished)):  # newest first
            if rank >= KEEP_JOBS or now - job.ended > KEEP_SECONDS:
                del self.jobs[job.id]
                shutil.rmtree(job.folder, ignore_errors=True)

    def close(self, wait_s: float = STOP_WAIT_S) -> None:
        """Cancel queued jobs, stop the running one at its next chunk, and wait up to `wait_s` for it."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        self.queue.put(None)
        self.worker.join(wait_s)
        if self.worker.is_alive():
            logger.warning(f"a submission job still runs {wait_s:g} s after the stop; it ends with the server")
