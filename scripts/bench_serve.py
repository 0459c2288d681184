"""Load-test `museum serve` over loopback: start it, send bounded traffic, stop it.

The server runs in its own process; this process is the client (stdlib only). Requests cycle
through three kinds, built from real catalogue rows: `text` (description only), `image`
(photo only) and `both`. Scenarios (`--scenario`, several allowed; each gets a fresh server):

- `throughput`: `--requests` requests, `--concurrency` at a time; p50/p95 latency per kind.
- `burst`: `--connections` (1,000) connections opened at once against /predict, then each sends
  its request; every one must be answered (200, or JSON 503/429 with Retry-After), none reset.
- `slowloris`: `--slow-sockets` (300) sockets send request heads one byte at a time for
  `--seconds` (60), reconnecting when closed, while a normal client sends `--normal` (100)
  requests spread over that time; the normal client should get >= 99 % 200s.

During `burst` and `slowloris` a second process polls /health every 0.1 s and reports the
worst latency (target <= 1 s). Prints a table and writes the figures as JSON under bench_results/.

    python scripts/bench_serve.py --text-model models/text --image-model models/image --scenario burst slowloris
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import multiprocessing
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
from museum.serve import Limits
from museum.serve.connections import raise_open_files_limit

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("text", "image", "both")
OUTCOMES = ("ok", "busy", "other", "reset", "timeout")  # 200 | JSON 503/429 + Retry-After | other answer | none | none in time


def multipart(fields: dict[str, str], image: bytes | None) -> tuple[bytes, str]:
    """A multipart/form-data body and its content type."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    if image is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="item.jpg"\r\n'
                     "Content-Type: image/jpeg\r\n\r\n".encode() + image + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def build_requests(data_dir: Path, n: int) -> list[tuple[str, bytes, str]]:
    """`n` (kind, body, content type) requests from rows that have both a description and a photo.

    At most 300 distinct bodies (100 items x 3 kinds) are built; longer lists repeat them."""
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
    for i in range(min(n, len(KINDS) * len(items))):
        kind, (description, photo) = KINDS[i % len(KINDS)], items[(i // len(KINDS)) % len(items)]
        fields = {"description": description} if kind != "image" else {}
        out.append((kind, *multipart(fields, photo if kind != "text" else None)))
    return [out[i % len(out)] for i in range(n)]


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


# ----------------------------------------------------------------------------- burst and slowloris


def raw_post(request: tuple[str, bytes, str]) -> bytes:
    _, body, content_type = request
    return (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def classify(answer: bytes) -> str:
    """One of OUTCOMES for a whole HTTP answer (the server closes after it: Connection: close)."""
    if not answer:
        return "reset"
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split()[1] if len(lines[0].split()) > 1 else ""
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    try:
        payload = json.loads(body)
    except ValueError:
        return "other"
    if status == "200" and payload.get("typology"):
        return "ok"
    if status in ("503", "429") and headers.get("retry-after", "").isdigit() and payload.get("detail"):
        return "busy"
    return "other"


async def exchange(port: int, data: bytes, timeout: float, gate: tuple[list, asyncio.Event] | None = None
                   ) -> tuple[str, float, str]:
    """Open a connection, send `data`, read to EOF: (outcome, seconds from sending, note).

    With `gate` = (counter, go): count the opened connection, then wait for `go` before sending."""
    answer, start = b"", time.perf_counter()
    try:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        finally:
            if gate is not None:
                gate[0].append(1)
        if gate is not None:
            await gate[1].wait()
            start = time.perf_counter()
        writer.write(data)
        await writer.drain()
        while chunk := await asyncio.wait_for(reader.read(65536), timeout):
            answer += chunk
        writer.close()
        outcome, note = classify(answer), answer.split(b"\r\n", 1)[0].decode("latin-1")
    except asyncio.TimeoutError:
        outcome, note = "timeout", "no answer in time"
    except OSError as exc:  # refused or reset: an answer already read still counts
        outcome, note = (classify(answer), "") if answer else ("reset", f"{type(exc).__name__}: {exc}"[:120])
    return outcome, time.perf_counter() - start, note


def poll_health(port: int, stop, out) -> None:
    """In its own process (no share of the client's GIL): GET /health every 0.1 s; sends the latencies."""
    latencies = []
    while not stop.is_set():
        start = time.perf_counter()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30).read()
            latencies.append(time.perf_counter() - start)
        except OSError:
            latencies.append(float("inf"))
        time.sleep(0.1)
    out.send(latencies)


class HealthPoller:
    def __init__(self, port: int):
        self.stop, (self.receive, send) = multiprocessing.Event(), multiprocessing.Pipe(duplex=False)
        self.process = multiprocessing.Process(target=poll_health, args=(port, self.stop, send), daemon=True)

    def __enter__(self):
        self.process.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.latencies = self.receive.recv() if self.receive.poll(60) else [float("inf")]
        self.process.join(10)


def outcome_row(results: list[tuple[str, float, str]], health: list[float]) -> dict:
    answered = np.array([r[1] for r in results if r[0] in ("ok", "busy", "other")] or [np.nan]) * 1000
    row = {"requests": len(results), **{o: sum(r[0] == o for r in results) for o in OUTCOMES}}
    for q in (50, 95, 99):
        row[f"p{q}_ms"] = round(float(np.nanpercentile(answered, q)), 1) if np.isfinite(answered).any() else None
    row["health_worst_ms"] = round(1000 * max(health), 1) if health else None
    row["health_polls"] = len(health)
    return row


async def burst(port: int, requests: list[tuple[str, bytes, str]], timeout: float) -> list[tuple[str, float, str]]:
    """All connections opened at once; once all are open (or failed), every one sends its request."""
    opened, go = [], asyncio.Event()
    tasks = [asyncio.create_task(exchange(port, raw_post(r), timeout, (opened, go))) for r in requests]
    deadline = time.monotonic() + timeout
    while len(opened) < len(tasks) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    go.set()
    return list(await asyncio.gather(*tasks))


async def slowloris(port: int, sockets: int, seconds: float, normal: list[tuple[str, bytes, str]],
                    interval: float = 0.5) -> tuple[list, dict]:
    """`sockets` slow heads (reconnecting when closed) for `seconds`, and the normal requests spread over them."""
    deadline = time.monotonic() + seconds
    counts = {"connections": 0, "closed_by_server": 0, "answered_408": 0}

    async def slow(k: int) -> None:
        head = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow-{k}: ".encode() + b"a" * 10_000
        while time.monotonic() < deadline:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(interval)
                continue
            counts["connections"] += 1
            sent = 0
            try:
                while time.monotonic() < deadline and sent < len(head):
                    writer.write(head[sent:sent + 1])
                    sent += 1
                    try:
                        data = await asyncio.wait_for(reader.read(4096), interval)
                    except asyncio.TimeoutError:
                        continue
                    counts["closed_by_server"] += 1
                    counts["answered_408"] += data.startswith(b"HTTP/1.1 408")
                    break
            except OSError:
                counts["closed_by_server"] += 1
            writer.close()

    warm_up = min(5.0, seconds / 4)  # the slow sockets are all open before the client starts

    async def client() -> list:
        results, gap = [], (seconds - warm_up) / max(1, len(normal))
        for request in normal:
            started = time.monotonic()
            results.append(await exchange(port, raw_post(request), 30))
            await asyncio.sleep(max(0.0, gap - (time.monotonic() - started)))
        return results

    attackers = [asyncio.create_task(slow(k)) for k in range(sockets)]
    await asyncio.sleep(warm_up)
    results = await client()
    await asyncio.gather(*attackers)
    return results, counts


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


def run_throughput(args, url: str) -> tuple[dict, list[str]]:
    requests = build_requests(args.data, args.requests)
    for request in requests[: len(KINDS)]:  # warm-up: first calls pay for lazy initialisation
        send(url, request)
    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(lambda r: send(url, r), requests))
    wall = time.perf_counter() - start
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
    return table, errors


def run_burst(args, port: int) -> tuple[dict, list[str]]:
    requests = build_requests(args.data, args.connections)
    with HealthPoller(port) as health:
        start = time.perf_counter()
        results = asyncio.run(burst(port, requests, timeout=60))
        wall = time.perf_counter() - start
    row = {**outcome_row(results, health.latencies), "seconds": round(wall, 1)}
    failed = []
    if row["reset"] or row["timeout"]:
        failed.append(f"{row['reset']} connection(s) reset and {row['timeout']} unanswered in 60 s (target 0)")
    row["notes"] = sorted({r[2] for r in results if r[0] != "ok"})[:10]
    return row, failed


def run_slowloris(args, port: int) -> tuple[dict, list[str]]:
    requests = build_requests(args.data, args.normal)
    with HealthPoller(port) as health:
        start = time.perf_counter()
        results, counts = asyncio.run(slowloris(port, args.slow_sockets, args.seconds, requests))
        wall = time.perf_counter() - start
    row = {**outcome_row(results, health.latencies), "seconds": round(wall, 1), "slow": counts}
    failed = []
    if row["ok"] < 0.99 * row["requests"]:
        failed.append(f"normal client: {row['ok']} of {row['requests']} answered 200 (target >= 99 %)")
    if row["health_worst_ms"] is None or row["health_worst_ms"] > 1000:
        failed.append(f"/health worst {row['health_worst_ms']} ms (target <= 1000 ms)")
    row["notes"] = sorted({r[2] for r in results if r[0] != "ok"})[:10]
    return row, failed


def print_load_table(rows: dict[str, dict]) -> None:
    print(f"{'scenario':<11}{'requests':>9}{'200':>6}{'503/429':>8}{'other':>6}{'reset':>6}{'timeout':>8}"
          f"{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'/health worst ms':>17}")
    for name, row in rows.items():
        print(f"{name:<11}{row['requests']:>9}{row['ok']:>6}{row['busy']:>8}{row['other']:>6}{row['reset']:>6}"
              f"{row['timeout']:>8}{row['p50_ms']!s:>9}{row['p95_ms']!s:>9}{row['p99_ms']!s:>9}{row['health_worst_ms']!s:>17}")
    if "slowloris" in rows:
        slow = rows["slowloris"]["slow"]
        print(f"slowloris: {slow['connections']} slow connections opened, {slow['closed_by_server']} closed by the "
              f"server ({slow['answered_408']} with a 408)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-model", default="models/text")
    parser.add_argument("--image-model", default="models/image")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "museum_multimodal",
                        help="train.csv + images/ to draw descriptions and photos from")
    parser.add_argument("--scenario", nargs="+", choices=("throughput", "burst", "slowloris"), default=["throughput"])
    parser.add_argument("--requests", type=int, default=500, help="throughput: requests in all")
    parser.add_argument("--concurrency", type=int, default=8, help="throughput: requests at a time")
    parser.add_argument("--connections", type=int, default=1000, help="burst: connections opened at once")
    parser.add_argument("--slow-sockets", type=int, default=300, help="slowloris: sockets sending heads byte by byte")
    parser.add_argument("--seconds", type=float, default=60.0, help="slowloris: how long")
    parser.add_argument("--normal", type=int, default=100, help="slowloris: requests of the normal client")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results")
    args = parser.parse_args()
    if not 1 <= args.requests <= 10_000 or not 1 <= args.concurrency <= 64:
        sys.exit("error: --requests must be 1..10000 and --concurrency 1..64")
    if not 1 <= args.connections <= 5000 or not 1 <= args.slow_sockets <= 2000 or not 1 <= args.normal <= 10_000:
        sys.exit("error: --connections must be 1..5000, --slow-sockets 1..2000 and --normal 1..10000")
    if not 1 <= args.seconds <= 600:
        sys.exit("error: --seconds must be 1..600")
    raise_open_files_limit()  # this process holds --connections sockets too

    args.out.mkdir(parents=True, exist_ok=True)
    rows, failed = {}, []
    for scenario in args.scenario:
        port = free_port()
        log = args.out / f"serve-{scenario}-server.log"
        server = start_server(args.text_model, args.image_model, port, args.device, log)
        try:
            if scenario == "throughput":
                _, errors = run_throughput(args, f"http://127.0.0.1:{port}/predict")
                failed += [f"throughput: {e}" for e in errors[:1]]
            else:
                send(f"http://127.0.0.1:{port}/predict", build_requests(args.data, 1)[0])  # warm-up
                rows[scenario], misses = (run_burst if scenario == "burst" else run_slowloris)(args, port)
                failed += [f"{scenario}: {m}" for m in misses]
        finally:
            server.terminate()
            server.wait(timeout=30)
        if "Traceback" in log.read_text(encoding="utf-8"):
            failed.append(f"{scenario}: a traceback in the server log {log}")
    if rows:
        defaults = Limits()
        print(f"load scenarios on loopback, {os.cpu_count()} CPUs; server defaults (queue {defaults.queue} per expert, "
              f"{defaults.head_timeout_s:g} s head deadline)")
        print_load_table(rows)
        out = args.out / f"serve-load-{datetime.now():%Y%m%d-%H%M%S}.json"
        out.write_text(json.dumps({"cpus": os.cpu_count(), "text_model": args.text_model, "image_model": args.image_model,
                                   "connections": args.connections, "slow_sockets": args.slow_sockets,
                                   "seconds": args.seconds, "normal": args.normal, "scenarios": rows, "failed": failed},
                                  indent=2, ensure_ascii=False), encoding="utf-8")
        print(f"written: {out}")
    for line in failed:
        print(f"target missed: {line}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
