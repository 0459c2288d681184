"""Load-test `museum serve` over loopback: start it, send a bounded burst of requests, stop it.

The server runs in its own process; this process is the client (stdlib only). Requests cycle
through three kinds, built from real catalogue rows: `text` (description only), `image`
(photo only) and `both`. Prints p50/p95 latency per kind and writes the figures as JSON
under bench_results/.

    python scripts/bench_serve.py --text-model models/text --image-model models/image
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np

from museum.data.images import ImageDecodeError, safe_open_image

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("text", "image", "both")


def multipart(fields: dict[str, str], image: bytes | None) -> tuple[bytes, str]:
    """A multipart/form-data body and its content type."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    if image is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="item.jpg"\r\n'
                     "Content-Type: image/jpeg\r\n\r\n".encode() + image + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def build_requests(data_dir: Path, n: int) -> list[tuple[str, bytes, str]]:
    """`n` (kind, body, content type) requests from rows that have both a description and a photo."""
    with open(data_dir / "train.csv", encoding="utf-8-sig", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["description"].strip()]
    items = []
    for row in rows:
        path = data_dir / "images" / f"{row['guid']}.jpg"
        try:
            safe_open_image(path)  # broken files are refused with a 422 by design: leave them out
        except ImageDecodeError:
            continue
        items.append((row["description"], path.read_bytes()))
        if len(items) >= 100:
            break
    if not items:
        sys.exit(f"error: no rows with a description and a photo in {data_dir}")
    out = []
    for i in range(n):
        kind, (description, photo) = KINDS[i % len(KINDS)], items[(i // len(KINDS)) % len(items)]
        fields = {"description": description} if kind != "image" else {}
        out.append((kind, *multipart(fields, photo if kind != "text" else None)))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(text_model: str, image_model: str, port: int, device: str, log: Path) -> subprocess.Popen:
    """`museum serve` in a second process; returns once /health answers."""
    cmd = [sys.executable, "-m", "museum", "serve", "--text-model", text_model, "--image-model", image_model,
           "--port", str(port), "--device", device, "--no-access-log"]
    process = subprocess.Popen(cmd, stdout=open(log, "w", encoding="utf-8"), stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"error: museum serve exited with {process.returncode}: {log.read_text(encoding='utf-8').strip()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return process
        except OSError:
            time.sleep(0.2)
    process.terminate()
    sys.exit("error: museum serve did not answer /health within 120 s")


def send(url: str, request: tuple[str, bytes, str]) -> tuple[str, float, str]:
    """(kind, seconds, error or '') for one POST /predict."""
    kind, body, content_type = request
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers={"content-type": content_type}),
                                    timeout=30) as response:
            answer = json.loads(response.read())
            error = "" if answer.get("typology") else "no typology in the answer"
    except (OSError, ValueError) as exc:  # HTTP errors, refused connections, timeouts, bad JSON
        error = f"{type(exc).__name__}: {exc}"[:200]
    return kind, time.perf_counter() - start, error


def summarise(results: list[tuple[str, float, str]], wall: float) -> dict:
    table = {}
    for kind in (*KINDS, "all"):
        mine = [r for r in results if kind in ("all", r[0])]
        ms = np.array([r[1] for r in mine]) * 1000
        table[kind] = {"requests": len(mine), "errors": sum(bool(r[2]) for r in mine),
                       "p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
                       "max_ms": round(float(ms.max()), 1)}
    table["all"]["requests_per_s"] = round(len(results) / wall, 1)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-model", default="models/text")
    parser.add_argument("--image-model", default="models/image")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "museum_multimodal",
                        help="train.csv + images/ to draw descriptions and photos from")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results")
    args = parser.parse_args()
    if not 1 <= args.requests <= 10_000 or not 1 <= args.concurrency <= 64:
        sys.exit("error: --requests must be 1..10000 and --concurrency 1..64")

    requests = build_requests(args.data, args.requests)
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = args.out / "serve-server.log"
    server = start_server(args.text_model, args.image_model, port, args.device, log)
    url = f"http://127.0.0.1:{port}/predict"
    try:
        for request in requests[: len(KINDS)]:  # warm-up: first calls pay for lazy initialisation
            send(url, request)
        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(lambda r: send(url, r), requests))
        wall = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(timeout=15)

    table = summarise(results, wall)
    print(f"{args.requests} requests, {args.concurrency} concurrent, {wall:.1f} s, "
          f"{table['all']['requests_per_s']} requests/s, {os.cpu_count()} CPUs")
    print(f"{'kind':<6}{'requests':>10}{'errors':>8}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}")
    for kind, row in table.items():
        print(f"{kind:<6}{row['requests']:>10}{row['errors']:>8}{row['p50_ms']:>9}{row['p95_ms']:>9}{row['max_ms']:>9}")
    errors = sorted({r[2] for r in results if r[2]})
    for error in errors[:5]:
        print(f"error: {error}")
    out = args.out / f"serve-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps({"requests": args.requests, "concurrency": args.concurrency, "seconds": round(wall, 2),
                               "cpus": os.cpu_count(), "text_model": args.text_model, "image_model": args.image_model,
                               "results": table, "errors": errors}, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"written: {out}")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
