"""The FastAPI app: the curator's page, the JSON API and submission jobs over the loaded experts.

`create_app` loads the models once; every route is a thin shell over `Predictor` (one item)
or `Jobs` (a CSV). Blocking work (decoding, inference, CSV validation) runs in threads, so
the event loop keeps answering `/health` and progress polls meanwhile. Predictions pass a
bounded queue (`InferenceGate`) and uploads take a place in the bounded submission queue
before their body is read; when either is full the answer is 503 JSON with `Retry-After`.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal, Optional

from fastapi import FastAPI, File, Form, HTTPException, Path as PathParam, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from museum import __version__
from museum.serve.forms import StrictFormRoute
from museum.serve.jobs import Job, Jobs
from museum.serve.limits import Busy, GuardMiddleware, InferenceGate, Limits, json_reply
from museum.serve.page import render_job, render_page, static_file
from museum.serve.service import InputError, Predictor

JOB_ID = PathParam(..., pattern=r"^[0-9a-f]{32}$", description="Id returned by POST /submit.")


class ExpertTop(BaseModel):
    typology: str
    probability: float


class PredictResponse(BaseModel):
    """The cascade's answer; `classes` and `probabilities` are sorted by probability, highest first."""

    typology: str
    route: Literal["text", "image", "blend", "fallback"]
    classes: list[str]
    probabilities: list[float]
    experts: dict[str, Optional[ExpertTop]]
    warnings: list[str]


class JobResponse(BaseModel):
    """A submission job; poll it until `state` is done (then fetch `download`) or error."""

    id: str
    state: Literal["queued", "running", "done", "error"]
    rows_done: int
    rows_total: int
    error: str
    routes: dict[str, int]
    seconds: float
    download: Optional[str]


class HealthResponse(BaseModel):
    status: Literal["ok"]
    models: dict[str, bool]
    version: str


class ModelInfo(BaseModel):
    classes: list[str]
    sha256: str = ""
    file: str = ""
    modified: str = ""


class ModelsResponse(BaseModel):
    package_version: str
    classes: list[str]
    text: Optional[ModelInfo]
    image: Optional[ModelInfo]
    routing: dict


class Admission:
    """ASGI middleware: a full queue refuses an upload with 503 before its body is read.

    `POST /predict` is refused while every expert's queue is full (once the body is in, the
    queue of its expert checks again). `POST /submit` takes a place in the job queue, sized by `Content-Length`
    (or by the CSV limit without one), before the upload spools to disk; the place is handed
    to the handler in `request.state.upload_ticket` and freed when the request ends unless it
    became a job.
    """

    def __init__(self, app, jobs: Jobs, gates: list[InferenceGate], csv_bytes: int):
        self.app, self.jobs, self.gates, self.csv_bytes = app, jobs, gates, csv_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in ("/predict", "/submit"):
            return await self.app(scope, receive, send)
        if scope["path"] == "/predict":
            if all(gate.full() for gate in self.gates):
                return await self.refuse(receive, send, self.gates[0].busy())
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        try:
            ticket = self.jobs.reserve(int(length) if length.isdigit() else self.csv_bytes)
        except Busy as exc:
            return await self.refuse(receive, send, exc)
        scope.setdefault("state", {})["upload_ticket"] = ticket
        try:
            await self.app(scope, receive, send)
        finally:
            self.jobs.end_upload(ticket)

    @staticmethod
    async def refuse(receive, send, exc: Busy) -> None:
        # Drop the body first (size-capped by GuardMiddleware): a connection closed with unread
        # data is reset, and the client may lose the answer with it.
        while (message := await receive())["type"] == "http.request" and message.get("more_body"):
            pass
        await json_reply(send, 503, str(exc), exc.headers)


def create_app(text_dir: Path | None, image_dir: Path | None, device: str = "auto",
               settings_file: Path | None = None, limits: Limits = Limits()) -> FastAPI:
    """Load the experts (either may be None) and return the app; a bad model folder is a `MuseumError`."""
    workdir = Path(tempfile.mkdtemp(prefix="museum-serve-"))
    try:
        predictor = Predictor(text_dir, image_dir, device, settings_file, workdir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    jobs = Jobs(predictor, workdir / "jobs", limits.jobs, limits.jobs_bytes)
    # One queue per expert, so that neither kind of request waits behind the other. Each expert
    # computes one request at a time (service.LockedModel); the photo queue's second thread
    # decodes the next photo meanwhile. Waits past a third of the timeout are refused: the
    # request would likely time out in the queue.
    gates = {"text": InferenceGate(1, limits.queue, limits.timeout_s / 3, "description"),
             "image": InferenceGate(2, limits.queue, limits.timeout_s / 3, "photo")}

    def gate_for(image: UploadFile | None) -> InferenceGate:
        return gates["image"] if image is not None and predictor.experts.image is not None else gates["text"]

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        for gate in gates.values():
            gate.close()
        await asyncio.to_thread(jobs.close)  # waits for the running job's next chunk: keep the loop free
        shutil.rmtree(workdir, ignore_errors=True)

    # Swagger UI and ReDoc load their scripts from a CDN, which is out of reach here: schema only.
    app = FastAPI(title="museum", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="Tell a museum item's typology from its photo, its Russian description, or both.")
    app.router.route_class = StrictFormRoute  # form fields that are not valid UTF-8 are a 422
    app.add_middleware(Admission, jobs=jobs, gates=list(gates.values()), csv_bytes=limits.csv_bytes)
    app.add_middleware(GuardMiddleware, limits=limits)  # outermost: oversized bodies are refused before anything
    app.state.predictor, app.state.jobs, app.state.gates, app.state.workdir = predictor, jobs, gates, workdir

    @app.exception_handler(Busy)
    async def busy(_request: Request, exc: Busy) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers=exc.headers)

    @app.exception_handler(InputError)
    async def input_error(_request: Request, exc: InputError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default is a list of pydantic records; clients get one line, like every other error.
        if request.url.path.startswith("/jobs/"):
            return JSONResponse({"detail": "no such job: ids are the 32 hex characters POST /submit returned"},
                                status_code=404)
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', 'invalid')}"
                 for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(parts)[:300]}, status_code=422)

    def predict_upload(description: str, image: UploadFile | None):
        """Score one upload (in its queue's thread: the photo is read only once it is its turn)."""
        data = image.file.read() if image is not None else None
        # A browser sends an empty, nameless file part when no file was chosen: that is "no image".
        if image is not None and not data and not image.filename:
            data = None
        return predictor.predict(description, data)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(render_page(predictor, limits))

    @app.post("/", response_class=HTMLResponse, include_in_schema=False)
    async def page_predict(image: UploadFile | None = File(None), description: str = Form("")) -> HTMLResponse:
        """The no-JavaScript form post: the same prediction, rendered into the page."""
        try:
            result = await gate_for(image).run(predict_upload, description, image)
        except InputError as exc:
            return HTMLResponse(render_page(predictor, limits, error=str(exc), description=description), 422)
        except Busy as exc:
            return HTMLResponse(render_page(predictor, limits, error=str(exc), description=description), 503,
                                headers=exc.headers)
        return HTMLResponse(render_page(predictor, limits, result, description=description))

    @app.post("/predict", response_model=PredictResponse,
              responses={422: {"description": "Nothing usable to score"}, 503: {"description": "Busy: retry after Retry-After s"}})
    async def predict(
        image: UploadFile | None = File(None, description="Photo of the item (JPEG, PNG, WebP, ...)."),
        description: str = Form("", description="Catalogue description, UTF-8 (Russian)."),
    ) -> PredictResponse:
        """Predict the typology of one item from its photo, its description, or both."""
        result = await gate_for(image).run(predict_upload, description, image)
        return PredictResponse(**vars(result))

    @app.post("/submit", status_code=202, response_model=JobResponse,
              responses={303: {"description": "Redirect to the progress page (form field page=1)"},
                         503: {"description": "Queue full: retry after Retry-After s"}})
    async def submit(request: Request,
                     file: UploadFile = File(..., description="Test CSV: guid,description[,typology], UTF-8."),
                     page: str = Form("", description="1: answer with a redirect to an HTML progress page.")):
        """Queue a submission (guid,typology) for a whole CSV; poll `GET /jobs/{id}` for progress."""
        ticket = getattr(request.state, "upload_ticket", None)
        job = await run_in_threadpool(jobs.start, await file.read(), ticket)
        if page:
            return RedirectResponse(f"/jobs/{job.id}/view", status_code=303)
        return JobResponse(**job.as_dict())

    def find(job_id: str) -> Job:
        job = jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no submission job {job_id}; it may have been replaced by newer ones")
        return job

    @app.get("/jobs/{job_id}", response_model=JobResponse)
    async def job_status(job_id: str = JOB_ID) -> JobResponse:
        """Progress of a submission job."""
        return JobResponse(**find(job_id).as_dict())

    @app.get("/jobs/{job_id}/view", response_class=HTMLResponse, include_in_schema=False)
    async def job_page(job_id: str = JOB_ID) -> HTMLResponse:
        return HTMLResponse(render_job(find(job_id)))

    @app.get("/jobs/{job_id}/submission.csv", response_class=FileResponse,
             responses={200: {"content": {"text/csv": {}}}, 409: {"description": "Job not finished"}})
    async def job_file(job_id: str = JOB_ID) -> FileResponse:
        """The finished submission file (guid,typology, UTF-8, CRLF line ends)."""
        job = find(job_id)
        if job.state != "done":
            raise HTTPException(409, f"submission job {job_id} is {job.state}, not done; poll /jobs/{job_id}")
        return FileResponse(job.out, media_type="text/csv; charset=utf-8", filename="submission.csv")

    @app.get("/health", response_model=HealthResponse)
    async def health() -> HealthResponse:
        """Liveness, and which experts are loaded."""
        experts = predictor.experts
        return HealthResponse(status="ok", version=__version__,
                              models={"text": experts.text is not None, "image": experts.image is not None})

    @app.get("/models", response_model=ModelsResponse)
    async def models() -> ModelsResponse:
        """Class names, model versions (weights file SHA-256) and the routing settings."""
        return ModelsResponse(**predictor.models())

    # Fixed names only: no file path is ever taken from the request.
    for name, media_type in (("style.css", "text/css; charset=utf-8"), ("app.js", "text/javascript; charset=utf-8")):
        body = static_file(name)
        app.add_api_route(f"/static/{name}", lambda body=body, media_type=media_type: Response(body, media_type=media_type),
                          methods=["GET"], include_in_schema=False)
    return app
