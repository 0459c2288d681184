"""Submission jobs: an uploaded CSV becomes a `guid,typology` file in the background, with progress.

The upload is validated (and its rows counted) before the job is queued, so a bad file is a
4xx at once. Jobs run one at a time through `museum.submit.submit`, with the server's
already loaded experts. Files live under the server's private work folder, in a folder
named by the job id the server generated: no path is ever built from user input.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from museum.data.competition import iter_competition_chunks
from museum.errors import MuseumError
from museum.log import logger
from museum.serve.service import InputError, Predictor
from museum.submit import submit

KEEP_JOBS = 20  # finished jobs kept for download; older ones are deleted


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

    @property
    def out(self) -> Path:
        return self.folder / "submission.csv"

    def as_dict(self) -> dict:
        return {"id": self.id, "state": self.state, "rows_done": self.rows_done, "rows_total": self.rows_total,
                "error": self.error, "routes": self.routes, "seconds": round(self.seconds, 2),
                "download": f"/jobs/{self.id}/submission.csv" if self.state == "done" else None}


class Jobs:
    """Queue of submission jobs over one worker thread (long files do not starve `/predict`)."""

    def __init__(self, predictor: Predictor, root: Path):
        self.predictor, self.root = predictor, root
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="museum-submit")

    def start(self, data: bytes) -> Job:
        """Validate an uploaded CSV and queue it; a bad file raises `InputError` with a one-line reason."""
        job_id = uuid.uuid4().hex
        folder = self.root / job_id
        folder.mkdir(parents=True)
        upload = folder / "upload.csv"
        upload.write_bytes(data)
        try:
            total = sum(len(chunk) for chunk in iter_competition_chunks(upload, chunk_size=50_000))
        except MuseumError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            # The reader names the file; the curator knows it as the CSV they uploaded, not our temp path.
            raise InputError(str(exc).replace(str(upload), "uploaded CSV")) from None
        job = Job(job_id, folder, total)
        with self.lock:
            self.jobs[job_id] = job
            self._forget_old()
        self.pool.submit(self._run, job)
        return job

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            return self.jobs.get(job_id)

    def _run(self, job: Job) -> None:
        job.state = "running"
        start = time.perf_counter()
        try:
            summary = submit(job.folder / "upload.csv", job.out, setup=self.predictor.setup,
                             progress=lambda rows: setattr(job, "rows_done", rows))
            job.routes = {route: n for route, n in summary.routes.items() if n}
            job.state = "done"
        except MuseumError as exc:
            job.error, job.state = str(exc).replace(str(job.folder / "upload.csv"), "uploaded CSV"), "error"
        except Exception as exc:  # noqa: BLE001 - a job must end in a state the page can show
            logger.exception(f"submission job {job.id} failed")
            job.error, job.state = f"internal error ({type(exc).__name__}); see the server log", "error"
        finally:
            job.seconds = time.perf_counter() - start

    def _forget_old(self) -> None:
        finished = [j for j in self.jobs.values() if j.state in ("done", "error")]
        for job in finished[: max(0, len(finished) - KEEP_JOBS)]:
            del self.jobs[job.id]
            shutil.rmtree(job.folder, ignore_errors=True)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
