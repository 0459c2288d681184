"""Measure `museum dedup` on injected near-duplicates.

Copies a character set (default ../shared/data/characters/simpsons_small) into a temporary
folder, adds an altered copy of 50 random images to the same class folder (each copy slightly
cropped by 3–8 % per side, resized to 60–90 %, and re-encoded as JPEG at quality 60–85), then
runs the dedup library once and scores the pairs it finds:

- recall: injected (original, copy) pairs that land in one group;
- precision: among found pairs that involve an injected copy, the share that are its original
  (pairs of two originals are pre-existing look-alikes in the data: counted and listed apart);
- images/s over the whole run (hashing, decoding, embedding, crop hashes, blockwise similarity),
  first run and cached rerun, for a few cosine thresholds from one embedding pass (the crop-hash
  rule, cosine ≥ HASH_FLOOR and hash distance ≤ MAX_HASH, applies at every threshold).

Usage: python scripts/bench_dedup.py [--set simpsons_small] [--copies 50] [--seed 0]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from museum.data.images import list_image_folder, safe_open_image  # noqa: E402
from museum.image.duplicates import finish_groups, image_groups  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "characters"


def altered_copy(src: Path, dst: Path, rng: np.random.Generator) -> None:
    img = safe_open_image(src)
    w, h = img.size
    fx, fy = rng.uniform(0.03, 0.08, 2)
    img = img.crop((int(fx * w), int(fy * h), w - int(fx * w), h - int(fy * h)))
    scale = rng.uniform(0.6, 0.9)
    img = img.resize((max(8, int(img.width * scale)), max(8, int(img.height * scale))), Image.BILINEAR)
    img.save(dst, format="JPEG", quality=int(rng.integers(60, 86)))


def pairs_of(groups) -> set[tuple[int, int]]:
    return {tuple(sorted(p)) for g in groups for p in itertools.combinations(g["members"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", default="simpsons_small")
    ap.add_argument("--copies", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--thresholds", default="0.92,0.94,0.96,0.98")
    ap.add_argument("--json", type=Path, default=ROOT / "bench_results" / "bench_dedup.json")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-dedup-") as tmp:
        folder = Path(tmp) / args.set
        shutil.copytree(SHARED / args.set, folder)
        originals = list_image_folder(folder).paths
        picked = rng.choice(len(originals), size=args.copies, replace=False)
        copy_of = {}
        for k in picked:
            src = originals[int(k)]
            dst = src.with_name(f"zz_copy_{src.stem}.jpg")
            altered_copy(src, dst, rng)
            copy_of[dst] = src
        paths = list_image_folder(folder).paths
        index = {p: i for i, p in enumerate(paths)}
        truth = {tuple(sorted((index[c], index[o]))) for c, o in copy_of.items()}
        copies = {index[c] for c in copy_of}
        cache = Path(tmp) / "embeddings.npz"
        results = {"set": args.set, "images": len(paths), "copies": args.copies, "seed": args.seed, "thresholds": {}}
        for n, t in enumerate(float(x) for x in args.thresholds.split(",")):
            start = time.perf_counter()
            groups = finish_groups(image_groups(paths, t, cache, device="cpu"), None)
            seconds = time.perf_counter() - start
            found = pairs_of(groups)
            with_copy = {p for p in found if p[0] in copies or p[1] in copies}
            tp = len(found & truth)
            res = {"recall": tp / len(truth), "precision": tp / max(len(with_copy), 1), "found_pairs": len(found),
                   "original_original_pairs": len(found - with_copy), "seconds": round(seconds, 2),
                   "images_per_s": round(len(paths) / seconds, 1)}
            if n == 0:
                results["first_run_images_per_s"] = res["images_per_s"]
            results["thresholds"][t] = res
            print(f"threshold {t:.2f}: recall {res['recall']:.3f}  precision {res['precision']:.3f}  "
                  f"({res['found_pairs']} pairs found, {res['original_original_pairs']} between originals)  "
                  f"{res['images_per_s']:.1f} images/s{' (first run: embeds)' if n == 0 else ' (cached embeddings)'}",
                  flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
