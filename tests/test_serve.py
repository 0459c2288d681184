"""`museum serve`: the JSON API (every input combination, every bad input), submission jobs,
the no-JavaScript page, and the page driven in headless Chromium over the DevTools protocol.

Models are tiny but real, trained here on slices of ../shared/data.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

if not os.environ.get("CI"):  # in CI a missing extra must fail, not skip
    pytest.importorskip("fastapi", reason="install the serve extra: pip install -e '.[dev]'")
from fastapi.testclient import TestClient  # noqa: E402

from museum.config import FusionConfig  # noqa: E402
from museum.fusion import save_settings  # noqa: E402
from museum.serve import Limits, create_app  # noqa: E402
from museum.serve.limits import MB  # noqa: E402
from csvrows import read_rows, write_rows  # noqa: E402
from serving import DESCRIPTION, unused_port, wait_until  # noqa: E402



# ----------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def client(models):
    """Both experts, default routing, a 1 MB body limit (so oversized uploads are cheap to make)."""
    with TestClient(create_app(*models, device="cpu", limits=Limits(upload_bytes=1 * MB, csv_bytes=2 * MB))) as c:
        yield c


def predict(client, description: str | None = None, image: bytes | None = None, filename: str = "item.jpg"):
    files = {"image": (filename, image, "image/jpeg")} if image is not None else None
    data = {"description": description} if description is not None else None
    return client.post("/predict", data=data, files=files)


def check_prediction(body: dict, classes: list[str]) -> None:
    assert body["typology"] in classes and body["typology"] == body["classes"][0]
    assert sorted(body["classes"]) == sorted(classes)
    p = body["probabilities"]
    assert p == sorted(p, reverse=True) and abs(sum(p) - 1) < 1e-3


# ----------------------------------------------------------------------------- API: good input


def test_health_models_and_schema(client, models):
    assert client.get("/health").json() == {"status": "ok", "models": {"text": True, "image": True}, "version": "0.1.0"}
    info = client.get("/models").json()
    text_classes = json.loads((models[0] / "metrics.json").read_text(encoding="utf-8"))["classes"]
    assert info["text"]["classes"] == text_classes and set(info["image"]["classes"]) <= set(info["classes"])
    assert len(info["text"]["sha256"]) == 12 and info["image"]["file"] == "best.pt"
    assert info["routing"]["text_threshold"] == 0.7 and info["routing"]["fallback"] in info["classes"]
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/submit", "/health", "/models", "/jobs/{job_id}"} <= set(schema["paths"])
    assert "image" in json.dumps(schema["components"]["schemas"])
    assert client.get("/docs").status_code == 404  # Swagger UI would load from a CDN


@pytest.mark.parametrize("inputs", ["text", "image", "both"])
def test_predict_each_input_combination(client, photo, inputs):
    classes = client.get("/models").json()["classes"]
    description = DESCRIPTION if inputs in ("text", "both") else None
    image = photo.read_bytes() if inputs in ("image", "both") else None
    response = predict(client, description, image)
    assert response.status_code == 200, response.text
    body = response.json()
    check_prediction(body, classes)
    assert (body["experts"]["text"] is not None) == (description is not None)
    assert (body["experts"]["image"] is not None) == (image is not None)
    assert body["route"] == {"text": "text", "image": "image"}.get(inputs, body["route"])
    assert body["route"] in ("text", "image", "blend") and body["warnings"] == []
    # Russian class names travel as UTF-8, not as \u escapes.
    assert response.headers["content-type"] == "application/json"
    assert body["typology"].encode("utf-8") in response.content


def test_blend_route_mixes_both_experts(models, photo, tmp_path):
    """Thresholds of 1.0 trust neither expert alone: the answer is the 0.3/0.7 blend of both."""
    settings = tmp_path / "fusion.json"
    save_settings(settings, FusionConfig(text_threshold=1.0, image_threshold=1.0, blend_weight=0.3))
    with TestClient(create_app(*models, device="cpu", settings_file=settings)) as c:
        both = predict(c, DESCRIPTION, photo.read_bytes()).json()
        text = dict(zip(*(lambda b: (b["classes"], b["probabilities"]))(predict(c, DESCRIPTION).json())))
        image = dict(zip(*(lambda b: (b["classes"], b["probabilities"]))(predict(c, None, photo.read_bytes()).json())))
    assert both["route"] == "blend"
    for name, p in zip(both["classes"], both["probabilities"]):
        assert p == pytest.approx(0.3 * text[name] + 0.7 * image[name], abs=1e-4)


def test_one_model_alone_and_unused_inputs(models, photo):
    with TestClient(create_app(models[0], None, device="cpu")) as c:
        assert c.get("/health").json()["models"] == {"text": True, "image": False}
        assert c.get("/models").json()["image"] is None
        both = predict(c, DESCRIPTION, photo.read_bytes())
        assert both.status_code == 200 and both.json()["route"] == "text"
        assert both.json()["warnings"] == ["no image model loaded: the image was not used"]
        alone = predict(c, None, photo.read_bytes())
        assert alone.status_code == 422 and alone.json()["detail"].startswith("nothing to score: give a description (")
        assert 'id="image" name="image" type="file" accept="image/*" disabled' in c.get("/").text
    with TestClient(create_app(None, models[1], device="cpu")) as c:
        response = predict(c, None, photo.read_bytes())
        assert response.status_code == 200 and response.json()["route"] == "image"
        assert predict(c, DESCRIPTION).json()["detail"].startswith("nothing to score: give an image (")


def test_a_browser_form_without_a_file_means_no_image(client):
    """Browsers send an empty, nameless file part when no file was chosen."""
    response = predict(client, DESCRIPTION, b"", filename="")
    assert response.status_code == 200 and response.json()["route"] == "text"


def test_concurrent_predictions_match_sequential_ones(client, photo):
    """8 threads through the locked experts give exactly the answers of one thread."""
    predictor = client.app.state.predictor
    items = [(DESCRIPTION, None), (None, photo.read_bytes()), (DESCRIPTION, photo.read_bytes()), ("Медаль", None)] * 4
    expected = [predictor.predict(d, i).probabilities for d, i in items]
    got: list = [None] * len(items)

    def work(k: int) -> None:
        got[k] = predictor.predict(*items[k]).probabilities

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_allclose(got, expected, atol=1e-6)


# ----------------------------------------------------------------------------- API: bad input


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("1", (width, height)).save(out, "PNG")  # a few KB on disk, huge once decoded
    return out.getvalue()


@pytest.mark.parametrize("description, image, status, message", [
    (None, None, 422, "nothing to score: give a description, an image, or both"),
    ("   \n ", None, 422, "nothing to score"),
    ("х" * 20_001, None, 422, "description: 20001 characters, limit 20000"),
    (None, b"", 422, "uploaded image: zero-byte file"),
    (None, "not an image".encode(), 422, "uploaded image: not an image; upload a JPEG, PNG or WebP photo"),
    (None, "truncated", 422, "uploaded image: truncated or corrupt"),
    (None, "bomb", 422, "uploaded image: absurd size (8000x8000 pixels, limit 25,000,000 pixels)"),
    (DESCRIPTION, b"\0" * (2 * MB), 413, "request body over 1 MB; send a smaller file"),
])
def test_bad_input_is_a_4xx_with_one_clear_line(client, photo, description, image, status, message):
    if image == "truncated":
        image = photo.read_bytes()[:300]
    elif image == "bomb":
        image = _png(8000, 8000)
    response = predict(client, description, image)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert detail.startswith(message) and "\n" not in detail


def test_oversized_body_without_a_length_is_cut_off(client):
    """A chunked upload that never says its size is stopped at the limit, not spooled to disk."""
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()

    def body():
        yield head
        for _ in range(40):
            yield b"\xff" * 65536  # 2.5 MB in all
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post("/predict", content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413 and "over 1 MB" in response.json()["detail"]


def test_wrong_field_types_and_a_slow_request(client, models):
    response = client.post("/predict", data={"image": "not a file", "description": DESCRIPTION})
    assert response.status_code == 422
    with TestClient(create_app(*models, device="cpu", limits=Limits(timeout_s=1e-4))) as c:
        response = predict(c, DESCRIPTION)
    assert response.status_code == 504 and response.json()["detail"].startswith("request took longer than 0.0001 s")


# ----------------------------------------------------------------------------- submissions


def wait_for_job(client, job: dict, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while job["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
        job = client.get(f"/jobs/{job['id']}").json()
    return job


def test_submit_a_csv_in_the_background(client, museum_test_csv):
    rows = read_rows(museum_test_csv)
    response = client.post("/submit", files={"file": ("test.csv", museum_test_csv.read_bytes(), "text/csv")})
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json())
    assert job["state"] == "done" and job["rows_done"] == job["rows_total"] == len(rows)
    # Rows without a description take the fallback class; the rest are routed by text.
    assert job["routes"] == {"text": len(rows) - 547, "fallback": 547}
    download = client.get(job["download"])
    assert download.status_code == 200 and download.headers["content-type"] == "text/csv; charset=utf-8"
    lines = download.content.decode("utf-8").split("\r\n")
    assert lines[0] == "guid,typology" and len(lines) == len(rows) + 2 and lines[-1] == ""
    submitted = list(csv.reader(lines[1:-1]))
    assert [g for g, _ in submitted] == [r["guid"] for r in rows]
    assert {t for _, t in submitted} <= set(client.get("/models").json()["classes"])


@pytest.mark.parametrize("content, message", [
    ("id,text\n1,a\n", "uploaded CSV line 1: missing column(s) guid, description"),
    ("guid,description\nA1,Ваза\nA1,Ваза\n", "uploaded CSV line 3, field guid: duplicated guid 'A1'"),
    (b"\x89PNG\r\n\x1a\n\0\0", "uploaded CSV: not a CSV file (binary content)"),
    ("guid,description\nA1,Ваза\n".encode("cp1251"), "uploaded CSV: not UTF-8 text (byte 20); save the CSV as UTF-8"),
    ("guid,description\n", "uploaded CSV: header only, no rows"),
    ("guid,description\n" + "A,б\n" * 600_000, "request body over 2 MB"),
])
def test_bad_csv_is_refused_at_once(client, content, message):
    data = content.encode("utf-8") if isinstance(content, str) else content
    response = client.post("/submit", files={"file": ("test.csv", data, "text/csv")})
    assert response.status_code in (413, 422) and response.json()["detail"].startswith(message), response.text
    assert "museum-serve-" not in response.text  # the server's own paths stay private


def test_unknown_jobs(client):
    assert client.get(f"/jobs/{'0' * 32}").status_code == 404
    assert client.get("/jobs/..%2F..%2Fetc").status_code in (404, 422)
    malformed = client.get("/jobs/not-a-job-id")
    assert malformed.status_code == 404 and malformed.json()["detail"].startswith("no such job")  # one line, not pydantic's list
    assert client.get(f"/jobs/{'0' * 32}/submission.csv").status_code == 404


# ----------------------------------------------------------------------------- the page without JavaScript


def test_page_works_without_javascript(client, photo):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN
    assert client.get("/static/app.js").status_code == client.get("/static/style.css").status_code == 200
    # The form posts to / and the server renders the result into the page.
    answer = client.post("/", data={"description": DESCRIPTION}, files={"image": ("p.jpg", photo.read_bytes(), "image/jpeg")})
    expected = predict(client, DESCRIPTION, photo.read_bytes()).json()
    assert answer.status_code == 200
    assert f'<p id="typology" class="typology">{expected["typology"]}</p>' in answer.text
    assert answer.text.count('<span class="fill" style="width:') == 5 and DESCRIPTION in answer.text
    error = client.post("/", data={"description": "<script>alert(1)</script>"}, files={"image": ("p.jpg", b"junk", "image/jpeg")})
    assert error.status_code == 422 and "uploaded image: not an image" in error.text
    assert "<script>alert" not in error.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in error.text
    # The CSV form redirects to a progress page that reloads itself until the download is ready.
    csv_text = "guid,description\nA1,Медаль за отвагу\nA2,\n"
    redirect = client.post("/submit", data={"page": "1"}, files={"file": ("t.csv", csv_text.encode(), "text/csv")},
                           follow_redirects=False)
    assert redirect.status_code == 303
    job_id = redirect.headers["location"].split("/")[2]
    wait_for_job(client, {"id": job_id, "state": "queued"})
    view = client.get(redirect.headers["location"]).text
    assert "Download submission.csv" in view and "2 of 2 rows · done" in view and "refresh" not in view


def test_serve_command_checks_its_options(tmp_path):
    from typer.testing import CliRunner

    from museum.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["serve", "--port", "0"])
    assert result.exit_code == 2 and "--port 0: must be between 1 and 65535" in result.output
    result = runner.invoke(app, ["serve", "--text-model", str(tmp_path), "--image-model", "none"])
    assert result.exit_code == 2 and "empty folder" in result.output and "Traceback" not in result.output


# ----------------------------------------------------------------------------- the page in Chromium

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=900,1100",
                  # Host names resolve to nothing: the page must work from the loopback server alone.
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]


def chromium_binary() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: apt-get install chromium")
        pytest.skip("chromium is not installed")
    if not os.environ.get("CI"):
        pytest.importorskip("websocket", reason="install the dev extra (websocket-client)")
    return path


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, url: str):
        import websocket

        # Chromium refuses websocket clients that send an Origin it does not allow.
        self.ws = websocket.create_connection(url, timeout=30, suppress_origin=True)
        self.next_id, self.events = 0, []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message.get("method"))

    def wait_loaded(self, url: str, timeout: float = 20.0) -> None:
        """Wait for a fully loaded document at `url` that `mark_old` has not marked."""
        wait_until(lambda: self.js(f"document.readyState === 'complete' && location.href === {json.dumps(url)} "
                                   "&& !window.museumOld"), timeout, f"{url} to load")

    def mark_old(self) -> None:
        """Tag the current document, so that `wait_loaded` waits for the next one."""
        self.js("window.museumOld = true")

    def js(self, expression: str):
        """The value of `expression` in the page; None while the page is being replaced."""
        try:
            return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")
        except RuntimeError:  # the no-JS progress page reloads itself, destroying the context
            return None

    def node(self, selector: str) -> int:
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        return self.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]

    def click(self, selector: str) -> None:
        node = self.node(selector)
        self.call("DOM.scrollIntoViewIfNeeded", nodeId=node)  # mouse events land in the viewport only
        quad = self.call("DOM.getBoxModel", nodeId=node)["model"]["content"]
        x, y = sum(quad[0::2]) / 4, sum(quad[1::2]) / 4
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)


@pytest.fixture(scope="module")
def server(models):
    """The real `museum serve` on a free loopback port, in its own process."""
    port = unused_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "museum", "serve", "--text-model", str(models[0]), "--image-model", str(models[1]),
         "--port", str(port), "--device", "cpu", "--no-access-log"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8",
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, process.stdout.read()
        try:
            return urllib.request.urlopen(url + "/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_until(healthy, 60, "museum serve to answer /health")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture()
def browser(tmp_path):
    """Headless Chromium with a fresh profile; yields a DevTools client on its first page."""
    profile = tmp_path / "profile"
    process = subprocess.Popen([chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                "--remote-debugging-port=0", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        active = profile / "DevToolsActivePort"
        wait_until(lambda: active.exists() and len(active.read_text().split()) == 2, 30, "Chromium's DevTools port")
        port = active.read_text().split()[0]
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5).read())
        page = next(t for t in targets if t["type"] == "page")
        devtools = DevTools(page["webSocketDebuggerUrl"])
        yield devtools
        devtools.ws.close()
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # its own group: the browser and its renderer processes
        process.wait(timeout=10)


@pytest.mark.parametrize("javascript", [True, False], ids=["js", "no-js"])
def test_page_in_headless_chromium(server, browser, photo, museum_test_csv, tmp_path, javascript):
    """Upload a real photo, type a Russian description, submit, and see the predicted class."""
    expected = json.loads(_post_predict(server, photo, DESCRIPTION))
    for domain in ("Page", "Runtime", "DOM"):
        browser.call(f"{domain}.enable")
    browser.call("Emulation.setScriptExecutionDisabled", value=not javascript)
    browser.call("Page.navigate", url=server + "/")
    browser.wait_loaded(server + "/")
    browser.call("DOM.setFileInputFiles", files=[str(photo)], nodeId=browser.node("#image"))
    # Focus through DevTools rather than a click: under load a click can land before layout, and the
    # inserted text then goes nowhere. Wait until the form holds both inputs before submitting.
    browser.call("DOM.focus", nodeId=browser.node("#description"))
    browser.call("Input.insertText", text=DESCRIPTION)
    wait_until(lambda: browser.js(f"document.getElementById('description').value === {json.dumps(DESCRIPTION)} "
                                  "&& document.getElementById('image').files.length === 1"), 10, "the filled form")
    browser.mark_old()
    browser.click("#predict-form button")
    if not javascript:
        browser.wait_loaded(server + "/")  # the form posted to / and the server drew the result
    shown = wait_until(lambda: browser.js("document.getElementById('result').hidden ? '' : "
                                          "document.getElementById('typology').textContent"), 20, "the result")
    shot = tmp_path / f"page-{'js' if javascript else 'no-js'}.png"
    shot.write_bytes(base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"]))
    print(f"screenshot: {shot}")
    assert shown == expected["typology"]
    assert browser.js("document.getElementById('route').textContent") == expected["route"]
    assert browser.js("document.querySelectorAll('#bars li').length") == 5
    assert browser.js("document.getElementById('description').value") == DESCRIPTION
    loaded = browser.js("performance.getEntriesByType('resource').map((r) => r.name)")
    assert loaded and all(name.startswith(server) for name in loaded), loaded
    # A CSV upload ends with the progress at "N of N rows · done" and a download link.
    rows = read_rows(museum_test_csv)[:300]
    csv_path = write_rows(tmp_path / "items.csv", ["guid", "description"], [[r["guid"], r["description"]] for r in rows])
    browser.call("DOM.setFileInputFiles", files=[str(csv_path)], nodeId=browser.node("#csv"))
    browser.click("#submit-form button")
    wait_until(lambda: "300 of 300 rows · done" in (browser.js("document.body.innerText") or ""), 30, "the submission")
    assert browser.js("[...document.querySelectorAll('a')].some((a) => a.textContent === 'Download submission.csv')")
    shot.with_name(shot.stem + "-csv.png").write_bytes(
        base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"]))
    assert shot.stat().st_size > 10_000


def _post_predict(url: str, photo: Path, description: str) -> str:
    """The same request through the JSON API, encoded by hand (no client library needed)."""
    boundary = "museum-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"description\"\r\n\r\n{description}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"p.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode("utf-8") + photo.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "/predict", data=body, method="POST",
                                     headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    return urllib.request.urlopen(request, timeout=30).read().decode("utf-8")


def test_busy_port_is_one_line_before_anything_loads():
    import socket

    from museum.errors import MuseumError
    from museum.serve import _check_port_free

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(MuseumError, match=f"--port {port}: cannot listen on 127.0.0.1:{port}"):
            _check_port_free("127.0.0.1", port)
    _check_port_free("127.0.0.1", port)  # free again once released


def test_model_file_that_is_not_a_regular_file_is_refused_not_read(tmp_path):
    """A FIFO in place of a weights file would block `open` forever: refused at once instead."""
    from museum.serve.service import file_version

    fifo = tmp_path / "best.pt"
    os.mkfifo(fifo)
    start = time.monotonic()
    with pytest.raises(OSError) as refused:
        file_version(fifo)
    assert "not a regular file (FIFO)" in getattr(refused.value, "reason", str(refused.value))
    assert time.monotonic() - start < 1
