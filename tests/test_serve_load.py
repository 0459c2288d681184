"""`museum serve` under load: nobody locked out, nothing unbounded, clean stops.

The bounded queues are checked in process (an expert's lock is held so that requests wait
where we want them); bursts, slow clients and signals against a real server on a loopback
port. Every loop is bounded and ends by itself within seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

if not os.environ.get("CI"):
    pytest.importorskip("fastapi", reason="install the serve extra: pip install -e '.[dev]'")
from fastapi.testclient import TestClient  # noqa: E402

from museum.serve import Limits, create_app  # noqa: E402
from museum.serve.limits import Busy, InferenceGate  # noqa: E402
from csvrows import read_rows, write_rows  # noqa: E402
from serving import DESCRIPTION, unused_port, wait_until  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- raw HTTP over loopback


def multipart(fields: dict[str, bytes], files: dict[str, tuple[str, bytes]] | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body with raw field bytes (any encoding) and its content type."""
    boundary = "museum-load-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'.encode() + v + b"\r\n"
             for k, v in fields.items()]
    for name, (filename, data) in (files or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def exchange(port: int, method: str, path: str, body: bytes = b"", content_type: str = "",
             timeout: float = 30) -> tuple[int, dict, bytes]:
    """One request on its own connection: (status, lower-case headers, body); OSError when no answer came."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    if body:
        head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head.encode() + b"\r\n" + body)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    if not answer:
        raise ConnectionResetError("closed without an answer")
    top, _, payload = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = top.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers, payload


def is_busy_answer(status: int, headers: dict, body: bytes) -> bool:
    return (status == 503 and headers.get("content-type", "").startswith("application/json")
            and int(headers.get("retry-after", "0")) >= 1 and json.loads(body)["detail"].startswith("server busy"))


# ----------------------------------------------------------------------------- queues, in process


def test_gate_bounds_running_and_waiting_calls():
    """1 running + 1 waiting; the third is refused at once; a timed-out call keeps its slot until its thread ends."""
    release = threading.Event()

    def blocked(tag: str) -> str:
        assert release.wait(10)
        return tag

    async def scenario():
        gate = InferenceGate(workers=1, queue=1)
        first = asyncio.create_task(gate.run(blocked, "first"))
        second = asyncio.create_task(gate.run(blocked, "second"))
        while gate.running + gate.waiting < 2:
            await asyncio.sleep(0.01)
        with pytest.raises(Busy) as busy:
            await gate.run(blocked, "third")
        assert 1 <= busy.value.retry_after <= 60 and str(busy.value).startswith(
            "server busy: 1 prediction(s) running and 1 waiting; retry in a few seconds")
        with pytest.raises(asyncio.TimeoutError):  # the first request gives up; its thread still computes
            await asyncio.wait_for(first, 0.05)
        assert gate.running == 1 and gate.waiting == 1 and gate.full()
        release.set()
        assert await second == "second"
        assert (gate.running, gate.waiting, gate.full()) == (0, 0, False)
        gate.close()

    asyncio.run(scenario())


@pytest.fixture()
def held_text_lock(models):
    """An app whose text expert is held by the test: text work waits until `release()`."""
    app = create_app(*models, device="cpu", limits=Limits(queue=0, jobs=1, jobs_bytes=1024))
    lock = app.state.predictor.experts.text.lock
    lock.acquire()
    released = threading.Event()

    def release():
        if not released.is_set():
            released.set()
            lock.release()

    with TestClient(app) as client:
        try:
            yield client, release
        finally:
            release()


def test_full_inference_queue_is_503_json_with_retry_after(held_text_lock, photo):
    """The text expert's queue is full (its one request holds the expert); the photo expert's is not."""
    client, release = held_text_lock
    gate = client.app.state.gates["text"]
    first: dict = {}
    worker = threading.Thread(target=lambda: first.update(r=client.post("/predict", data={"description": DESCRIPTION})))
    worker.start()
    wait_until(lambda: gate.running == 1, 10, "the first prediction to hold the only slot")
    refused = client.post("/predict", data={"description": DESCRIPTION})
    assert is_busy_answer(refused.status_code, refused.headers, refused.content), refused.text
    page = client.post("/", data={"description": DESCRIPTION})  # the no-JS page says it in the page
    assert page.status_code == 503 and "server busy" in page.text and page.headers["retry-after"]
    assert client.get("/health").status_code == 200  # never waits on inference
    photo_only = client.post("/predict", files={"image": ("p.jpg", photo.read_bytes(), "image/jpeg")})
    assert photo_only.status_code == 200 and photo_only.json()["route"] == "image"  # its own queue
    release()
    worker.join(10)
    assert first["r"].status_code == 200 and first["r"].json()["route"] in ("text", "blend")


def test_submit_queue_is_bounded_and_cleaned(held_text_lock):
    client, release = held_text_lock
    csv_bytes = "guid,description\nA1,Медаль за отвагу\nA2,\n".encode()
    first = client.post("/submit", files={"file": ("a.csv", csv_bytes, "text/csv")})
    assert first.status_code == 202, first.text
    second = client.post("/submit", files={"file": ("b.csv", csv_bytes, "text/csv")})  # 1 job at most
    assert second.status_code == 503 and int(second.headers["retry-after"]) >= 1
    assert second.json()["detail"].startswith("submission queue full (1 CSV(s)")
    release()
    job = wait_until(lambda: (j := client.get(f"/jobs/{first.json()['id']}").json())["state"] == "done" and j, 20,
                     "the job to finish")
    assert job["rows_done"] == 2
    files = sorted(p.name for p in (client.app.state.workdir / "jobs" / job["id"]).iterdir())
    assert files == ["submission.csv"]  # the upload is gone once the job ended
    again = client.post("/submit", files={"file": ("c.csv", csv_bytes, "text/csv")})  # its place is free again
    assert again.status_code == 202, again.text


def test_submit_queue_is_bounded_in_bytes(models):
    app = create_app(*models, device="cpu", limits=Limits(jobs=5, jobs_bytes=1000))
    jobs = app.state.jobs
    with TestClient(app) as client:
        holder = jobs.reserve(600)  # an upload in flight, as the middleware takes it
        body = ("guid,description\n" + "".join(f"A{i},Медаль\n" for i in range(40))).encode()  # ~700 bytes
        refused = client.post("/submit", files={"file": ("a.csv", body, "text/csv")})
        assert refused.status_code == 503 and "MB pending" in refused.json()["detail"], refused.text
        jobs.end_upload(holder)
        assert client.post("/submit", files={"file": ("a.csv", body, "text/csv")}).status_code == 202


@pytest.mark.parametrize("path, field", [("/predict", "description"), ("/", "description"), ("/submit", "page")])
def test_invalid_utf8_in_a_form_field_is_422_naming_it(models, path, field):
    app = create_app(*models, device="cpu")
    with TestClient(app) as client:
        # A Cyrillic letter, then bytes that are no UTF-8; /submit gets a good CSV so that only the field is wrong.
        files = {"file": ("a.csv", "guid,description\nA1,Ваза\n".encode())} if path == "/submit" else None
        body, content_type = multipart({field: b"\xd0\x9f\xff\xfe"}, files)
        response = client.post(path, content=body, headers={"content-type": content_type})
        assert response.status_code == 422 and response.headers["content-type"] == "application/json"
        assert response.json()["detail"] == f"form field '{field}': not valid utf-8 text (byte 2); send it as UTF-8"
        encoded = client.post(path, content=f"{field}=%D0%9F%FF".encode(),
                              headers={"content-type": "application/x-www-form-urlencoded"})
        assert encoded.status_code == 422 and f"'{field}'" in encoded.json()["detail"]
        assert not list((app.state.workdir / "jobs").glob("*"))  # nothing was queued
        if path == "/predict":  # valid UTF-8 still goes through, both ways
            body, content_type = multipart({field: DESCRIPTION.encode()})
            assert client.post(path, content=body, headers={"content-type": content_type}).status_code == 200
            assert client.post(path, data={field: DESCRIPTION}).status_code == 200


# ----------------------------------------------------------------------------- a real server on loopback


def start_server(models, limits: dict, cli: bool = False) -> tuple[subprocess.Popen, int]:
    """`run_server` with these limits (or the `museum serve` command) in a child process; waits for /health."""
    port = unused_port()
    if cli:
        command = [sys.executable, "-m", "museum", "serve", "--text-model", str(models[0]),
                   "--image-model", str(models[1]), "--port", str(port), "--device", "cpu", "--no-access-log"]
    else:
        code = ("import json, sys; from pathlib import Path; from museum.log import setup_logging; "
                "from museum.serve import Limits, run_server; a = json.loads(sys.argv[1]); setup_logging(); "
                "run_server(Path(a['text']), Path(a['image']), port=a['port'], device='cpu', "
                "limits=Limits(**a['limits']), access_log=False)")
        command = [sys.executable, "-c", code,
                   json.dumps({"text": str(models[0]), "image": str(models[1]), "port": port, "limits": limits})]
    # A shell may start us with SIGINT ignored, which children inherit: give the server Ctrl-C back.
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def healthy() -> bool:
        assert process.poll() is None, process.communicate()[0]
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
        except OSError:
            return False

    wait_until(healthy, 60, "the server to answer /health")
    return process, port


def stop(process: subprocess.Popen) -> str:
    if process.poll() is None:
        process.terminate()
    return process.communicate(timeout=30)[0]


@pytest.fixture(scope="module")
def live(models):
    """Two waiting per expert; a 1 s head deadline. Its log must hold no traceback."""
    process, port = start_server(models, {"queue": 2, "head_timeout_s": 1.0})
    yield port
    log = stop(process)
    assert "Traceback" not in log and "Exceeded concurrency" not in log, log


def test_a_burst_gets_answers_never_resets(live, photo):
    """60 requests with a photo at once, 4 places (2 computing or decoding, 2 waiting): each gets a 200 or
    a JSON 503 with Retry-After, none a bare reset."""
    body, content_type = multipart({"description": DESCRIPTION.encode()}, {"image": ("p.jpg", photo.read_bytes())})
    start = threading.Barrier(60)
    answers: list = [None] * 60

    def client(k: int) -> None:
        start.wait(10)
        try:
            answers[k] = exchange(live, "POST", "/predict", body, content_type)
        except OSError as exc:
            answers[k] = exc

    threads = [threading.Thread(target=client, args=(k,)) for k in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    failures = [a for a in answers if isinstance(a, OSError) or a is None]
    ok = [a for a in answers if not isinstance(a, OSError) and a is not None and a[0] == 200]
    busy = [a for a in answers if not isinstance(a, OSError) and a is not None and is_busy_answer(*a)]
    print(f"burst of 60: {len(ok)} answered 200, {len(busy)} answered 503, {len(failures)} without an answer")
    assert not failures and len(ok) + len(busy) == 60 and ok
    assert all(json.loads(a[2])["typology"] for a in ok)


def test_hundreds_of_idle_connections_lock_nobody_out(live):
    """uvicorn's old limit (64) counted idle sockets: 300 open ones, 50 of them kept alive after an
    answer, must leave /health and /predict answering at once."""
    idle = [socket.create_connection(("127.0.0.1", live), timeout=5) for _ in range(300)]
    try:
        for s in idle[:50]:  # a keep-alive client that got its answer and stays connected
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
        start = time.perf_counter()
        assert exchange(live, "GET", "/health")[0] == 200
        assert time.perf_counter() - start < 1.0
        body, content_type = multipart({"description": DESCRIPTION.encode()})
        status, _, answer = exchange(live, "POST", "/predict", body, content_type)
        assert status == 200, answer
    finally:
        for s in idle:
            s.close()


def test_open_files_limit_is_raised_toward_the_hard_limit():
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    want = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
    code = "from museum.serve.connections import raise_open_files_limit; print(raise_open_files_limit())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)))
    assert int(out.stdout) == want, out.stderr


def test_slow_and_idle_connections_are_closed_and_health_stays_fast(live):
    """30 sockets send a head a byte at a time, 10 send nothing: all are closed past the 1 s deadline,
    and /health answers within 1 s throughout."""
    slow = [socket.create_connection(("127.0.0.1", live), timeout=5) for _ in range(30)]
    idle = [socket.create_connection(("127.0.0.1", live), timeout=5) for _ in range(10)]
    opened = time.monotonic()
    closed_after: dict[int, float] = {}
    answers: dict[int, bytes] = {}
    for s in slow + idle:
        s.setblocking(False)
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200
    worst_health, sent = 0.0, 0
    while len(closed_after) < len(slow) + len(idle) and time.monotonic() - opened < 6:
        for k, s in enumerate(slow + idle):
            if k in closed_after:
                continue
            try:  # read first: an answer already sent is not lost to a reset our next byte would cause
                data = s.recv(4096)
            except BlockingIOError:
                if k < len(slow):
                    s.send(head[sent:sent + 1])
                continue
            except OSError:  # reset: closed too
                data = b""
            answers[k] = answers.get(k, b"") + data
            if not data:
                closed_after[k] = time.monotonic() - opened
        sent += 1
        t = time.perf_counter()
        status, _, _ = exchange(live, "GET", "/health", timeout=5)
        worst_health = max(worst_health, time.perf_counter() - t)
        assert status == 200
        time.sleep(0.05)
    for s in slow + idle:
        s.close()
    print(f"closed {len(closed_after)} of 40 after {min(closed_after.values(), default=0):.2f}-"
          f"{max(closed_after.values(), default=0):.2f} s; /health worst {1000 * worst_health:.0f} ms")
    assert len(closed_after) == 40 and 0.8 <= min(closed_after.values()) and max(closed_after.values()) < 4
    assert worst_health < 1.0
    assert all(answers[k].startswith(b"HTTP/1.1 408 ") for k in range(len(slow)))  # told why
    assert all(answers[k] == b"" for k in range(len(slow), len(slow) + len(idle)))  # idle: closed silently


@pytest.mark.parametrize("signals", [("SIGINT", "SIGINT"), ("SIGTERM",)], ids=["ctrl-c-twice", "sigterm"])
def test_stopping_during_a_job_cancels_it_without_a_traceback(models, museum_test_csv, tmp_path, signals):
    rows = read_rows(museum_test_csv)
    big = write_rows(tmp_path / "big.csv", ["guid", "description"],
                     [[f"{r['guid']}-{k}", r["description"]] for k in range(60) for r in rows])  # ~73,000 rows
    process, port = start_server(models, {}, cli=True)
    try:
        body, content_type = multipart({}, {"file": ("big.csv", big.read_bytes())})
        status, _, answer = exchange(port, "POST", "/submit", body, content_type)
        assert status == 202, answer
        job_id = json.loads(answer)["id"]
        wait_until(lambda: json.loads(exchange(port, "GET", f"/jobs/{job_id}")[2])["rows_done"] > 0, 30,
                   "the job to make progress")
        for name in signals:
            process.send_signal(getattr(signal, name))
            time.sleep(0.3)
        log = process.communicate(timeout=30)[0]
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert "Traceback" not in log, log
    assert f"submission job {job_id} cancelled at row" in log and "the server is stopping" in log, log
