"""How long a catalogue takes: `museum submit` end to end, and 10 million rows from the measured rates.

Times the real command (a fresh process: loading, reading the CSV, decoding JPEGs, scoring, writing) on
  text   --text-rows text-only rows (museum/test.csv's descriptions, each made unique by an inventory number),
  images --image-rows image-only rows (museum_multimodal's photos, copied under new guids into a temporary
         folder, no description: only the image expert is called),
each also on 20 rows, so that the rate leaves out the fixed start-up cost: rate = (N - 20) / (t(N) - t(20)).
From these rates it prints the time to score 10 million rows on one machine like this one, and on N such
machines with `torchrun --nnodes N -m museum submit` (contiguous shards: N times the rate, plus one start-up).

    python scripts/bench_catalogue.py --text-model models/text --image-model models/image [--device cuda]
    python scripts/bench_catalogue.py --nproc 2 ...   # torchrun --standalone --nproc-per-node 2 on this machine

Prints a table and writes bench_results/bench_catalogue.json (git-ignored).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from museum.data.competition import read_competition_csv  # noqa: E402
from museum.utils import write_csv, write_json  # noqa: E402

DATA = Path(os.environ.get("MUSEUM_SHARED_DATA", ROOT.parent / "shared" / "data"))
CATALOGUE = 10_000_000
SMALL = 20


def text_file(folder: Path, n: int) -> Path:
    descriptions = [d for d in read_competition_csv(DATA / "museum" / "test.csv").descriptions if d]
    # Every row unique (a catalogue number appended), as a catalogue's are: submit scores a repeated
    # description once, so test.csv's 676 descriptions repeated would measure its cache, not the model.
    return write_csv(folder / f"text-{n}.csv", ["guid", "description"],
                     ([f"t{i}", f"{descriptions[i % len(descriptions)]} инв. {i}"] for i in range(n)))


def image_file(folder: Path, n: int) -> tuple[Path, Path]:
    source = DATA / "museum_multimodal" / "images"
    photos = sorted(p for p in source.glob("*.jpg") if p.stat().st_size > 0)
    images = folder / f"images-{n}"
    images.mkdir()
    for i in range(n):  # a copy each: the submit reads n files, as a catalogue's would be
        shutil.copyfile(photos[i % len(photos)], images / f"p{i}.jpg")
    return write_csv(folder / f"images-{n}.csv", ["guid", "description"], ([f"p{i}", ""] for i in range(n))), images


def submit_seconds(csv_path: Path, out: Path, args, images: Path | None) -> float:
    # --nproc N: N ranks on this machine, each scoring its contiguous shard (`torchrun --standalone` picks the port)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc)]
                if args.nproc > 1 else [sys.executable])
    command = [*launcher, "-m", "museum", "--quiet", "submit", str(csv_path), "--out", str(out),
               "--device", args.device, "--text-model", str(args.text_model) if images is None else "none",
               "--image-model", str(args.image_model) if images is not None else "none"]
    if images is not None:
        command += ["--images", str(images), "--workers", str(args.workers), "--batch-size", str(args.batch_size)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"bench_catalogue: {' '.join(command)} failed: {(done.stderr or done.stdout).strip()[-500:]}")
    return seconds


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 48 * 3600 else f"{seconds / 86400:.1f} days"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-model", type=Path, default=Path("models/text"))
    parser.add_argument("--image-model", type=Path, default=Path("models/image"))
    parser.add_argument("--text-rows", type=int, default=200_000)
    parser.add_argument("--image-rows", type=int, default=3_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2, help="submit --workers (image decoding processes)")
    parser.add_argument("--batch-size", type=int, default=0, help="submit --batch-size (0 = submit's choice by device)")
    parser.add_argument("--nproc", type=int, default=1, help="processes on this machine (torchrun --nproc-per-node)")
    parser.add_argument("--machines", default="1,10,100", help="N for the N-machine estimate")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "bench_catalogue.json")
    args = parser.parse_args()
    machines = [int(n) for n in args.machines.split(",") if n.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        # Each model alone, away from a fusion.json tuned for both (submit would refuse it for one expert);
        # only the models whose rows are timed are needed.
        if args.text_rows > SMALL:
            args.text_model = Path(shutil.copytree(args.text_model, work / "models" / "text"))
        if args.image_rows > SMALL:
            args.image_model = Path(shutil.copytree(args.image_model, work / "models" / "image"))
        for modality, n in (("text", args.text_rows), ("images", args.image_rows)):
            if n <= SMALL:
                continue
            timings = {}
            for size in (SMALL, n):
                if modality == "text":
                    path, images = text_file(work, size), None
                else:
                    path, images = image_file(work, size)
                timings[size] = submit_seconds(path, work / f"{modality}-{size}-out.csv", args, images)
            rate = (n - SMALL) / max(timings[n] - timings[SMALL], 1e-9)
            startup = timings[SMALL]
            rows.append({"modality": modality, "rows": n, "seconds": round(timings[n], 2),
                         "startup_seconds": round(startup, 2), "rows_per_second": round(rate, 1),
                         "catalogue_seconds": {str(m): round(startup + CATALOGUE / (rate * m), 1) for m in machines}})
    result = {"device": args.device, "nproc": args.nproc, "workers": args.workers, "batch_size": args.batch_size,
              "cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
              "catalogue_rows": CATALOGUE, "rows": rows,
              "command": " ".join(sys.argv)}
    print(f"`museum submit` end to end ({args.device}, {args.nproc} process(es), {os.cpu_count()} CPUs, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())})")
    print(f"{'modality':9}{'rows':>9}{'seconds':>9}{'start-up s':>11}{'rows/s':>9}"
          + "".join(f"{f'10M on {m}':>14}" for m in machines))
    for r in rows:
        print(f"{r['modality']:9}{r['rows']:9d}{r['seconds']:9.1f}{r['startup_seconds']:11.1f}{r['rows_per_second']:9.0f}"
              + "".join(f"{_duration(r['catalogue_seconds'][str(m)]):>14}" for m in machines))
    write_json(args.out, result)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
