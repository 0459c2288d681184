"""Benchmark embedding heads against fine-tuning, in one run (timings are only comparable within a run).

For every character set, and for museum_multimodal's photos (competition layout: train.csv +
images/{guid}.jpg): macro-F1 on train-image's default stratified 80/20 split (seed 0) and
wall seconds of (a) fine-tuning with default options and (b) each head on frozen embeddings
(the embedding pass is counted in every head's time). Then two yes/no tasks, "homer vs rest"
(simpsons_small) and "miku vs rest" (quintuplets_faces): ROC-AUC, PR-AUC and F1 at the chosen
threshold for fine-tuning and each head.

    python scripts/bench_heads.py [--quick] [--datasets simpsons_small,quintuplets] [--no-binary]
                                  [--head-backbones mobilenet_v2,tf_efficientnet_lite0]

Prints tables and writes bench_results/bench_heads.json (rewritten after every set, so an
interrupted run keeps what it measured). --quick: 2 fine-tuning epochs, no MLP head.
--head-backbones: the heads run on each of these backbones' features (one embedding pass each;
fine-tuning keeps the default backbone); rows are then named head@backbone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from museum.config import ImageConfig, config_to_dict  # noqa: E402
from museum.image.embed import embed_folder  # noqa: E402
from museum.train_image import train_image_model  # noqa: E402
from museum.log import setup_logging  # noqa: E402

SHARED = Path(os.environ.get("MUSEUM_SHARED_DATA", ROOT.parent / "shared" / "data"))
DATA = SHARED / "characters"
DATASETS = ["simpsons_small", "quintuplets_faces", "quintuplets", "simpsons_mnist", "museum_multimodal"]
# Sets in the competition layout (train.csv + images/{guid}.jpg); the others are folder-per-class.
CSV_SETS = {"museum_multimodal": (SHARED / "museum_multimodal" / "images", SHARED / "museum_multimodal" / "train.csv")}
HEADS = ["logreg", "svm", "mlp", "knn"]
BINARY = [("simpsons_small", "homer"), ("quintuplets_faces", "miku")]
EMBED_SECONDS: dict[tuple[str, str], float] = {}


def source(name: str) -> tuple[Path, Path | None]:
    """(images, train_csv or None) of a benchmark set."""
    return CSV_SETS.get(name, (DATA / name, None))


def run(config: ImageConfig, name: str, out: Path, extra_seconds: float = 0.0, label_backbone: str = "") -> dict:
    start = time.perf_counter()
    images, train_csv = source(name)
    model = train_image_model(config, images, out, train_csv=train_csv)
    seconds = time.perf_counter() - start + extra_seconds
    report = model.report_
    on_other = config.head != "finetune" and config.backbone != label_backbone
    method = f"{config.head}@{config.backbone}" if on_other else config.head
    row = {"method": method, "macro_f1": round(report["validation"]["macro_f1"], 4),
           "accuracy": round(report["validation"]["accuracy"], 4), "seconds": round(seconds, 1)}
    if config.head != "finetune":
        row["params"] = report["head"]["params"]
        row["cv_macro_f1"] = report["head"]["cv_macro_f1"]
    else:
        row["epochs_run"] = len(report["history"])
    if "binary" in report:
        b = report["binary"]
        row.update(roc_auc=round(b["roc_auc"], 4), pr_auc=round(b["average_precision"], 4), f1=round(b["f1"], 4),
                   threshold=round(b["threshold"], 4), precision=round(b["precision"], 4), recall=round(b["recall"], 4))
    return row


def bench_set(name: str, base: ImageConfig, heads: list[str], out_root: Path, positive: str | None = None,
              head_backbones: list[str] | None = None) -> dict:
    tag = f"{name}-{positive}" if positive else name
    base = replace(base, positive=positive)
    rows = [run(base, name, out_root / tag / "finetune")]
    embed_seconds = {}
    for backbone in head_backbones or [base.backbone]:
        file = out_root / name / f"embeddings-{backbone.replace(':', '_')}.npz"
        if (name, backbone) not in EMBED_SECONDS:  # the yes/no runs reuse the file: charge them the same pass
            file.unlink(missing_ok=True)  # a cache left by an earlier run would hide the embedding cost
            start = time.perf_counter()
            images, train_csv = source(name)
            embed_folder(images, file, train_csv=train_csv, backbone=backbone, tta=base.tta)
            EMBED_SECONDS[name, backbone] = time.perf_counter() - start
        embed_seconds[backbone] = round(EMBED_SECONDS[name, backbone], 1)
        for head in heads:
            rows.append(run(replace(base, head=head, backbone=backbone, embeddings=str(file)), name,
                            out_root / tag / f"{head}-{backbone.replace(':', '_')}", EMBED_SECONDS[name, backbone],
                            label_backbone=base.backbone))
    ft = rows[0]
    for r in rows:
        r["f1_gap"] = round(ft["macro_f1"] - r["macro_f1"], 4)
        r["speedup"] = round(ft["seconds"] / max(r["seconds"], 1e-9), 1)
    # The best head among those at >= 10x the speed (with several backbones a slower head may score higher).
    fast = [r for r in rows[1:] if r["speedup"] >= 10] or rows[1:]
    best = max(fast, key=lambda r: (r.get("f1", r["macro_f1"]), -r["seconds"]))
    return {"dataset": name, "positive": positive, "embed_seconds": embed_seconds, "rows": rows,
            "best_head": best["method"],
            "target_met": bool(best["f1_gap"] <= 0.02 and best["speedup"] >= 10) if not positive else None}


def print_set(result: dict) -> None:
    title = result["dataset"] + (f": {result['positive']} vs rest" if result["positive"] else "")
    passes = ", ".join(f"{b} {s}s" for b, s in result["embed_seconds"].items())
    print(f"\n{title} (embedding pass {passes}, counted in every head on it)")
    binary = result["positive"] is not None
    width = max(9, *(len(r["method"]) for r in result["rows"]))
    head = f"{'method':{width}} {'macro-F1':>8} {'gap':>7} {'seconds':>8} {'speed-up':>8}"
    print(head + (f" {'ROC-AUC':>7} {'PR-AUC':>6} {'F1':>6} {'thresh':>6}" if binary else "  params"))
    for r in result["rows"]:
        line = f"{r['method']:{width}} {r['macro_f1']:8.4f} {r['f1_gap']:7.4f} {r['seconds']:8.1f} {r['speedup']:7.1f}x"
        if binary:
            line += f" {r['roc_auc']:7.4f} {r['pr_auc']:6.4f} {r['f1']:6.4f} {r['threshold']:6.3f}"
        else:
            line += f"  {json.dumps(r.get('params', {'epochs': r.get('epochs_run')}))}"
        print(line)
    if not binary:
        print(f"best head at >= 10x (else overall) {result['best_head']}: target (gap <= 0.02 at >= 10x) "
              f"{'met' if result['target_met'] else 'not met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 fine-tuning epochs and no MLP head.")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--no-binary", action="store_true", help="Skip the one-vs-rest measurements.")
    parser.add_argument("--head-backbones", default=None,
                        help="Comma-separated backbones whose features the heads run on (default: fine-tuning's).")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "bench_heads.json")
    args = parser.parse_args()
    setup_logging()
    base = replace(ImageConfig(), epochs=2) if args.quick else ImageConfig()
    heads = [h for h in HEADS if not (args.quick and h == "mlp")]
    out_root = args.out.parent / "heads_runs"
    names = [n for n in args.datasets.split(",") if n]
    head_backbones = [b for b in (args.head_backbones or base.backbone).split(",") if b]
    result = {"config": config_to_dict(base), "quick": args.quick, "cpus": os.cpu_count(), "head_backbones": head_backbones,
              "load_average": os.getloadavg(), "sets": [], "binary": []}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))

    # Small sets first, the yes/no tasks next, the 8000-image set last: the slowest part comes at the end.
    plan = [(n, None) for n in names if n != "simpsons_mnist"]
    plan += [] if args.no_binary else [(n, p) for n, p in BINARY if n in names]
    plan += [(n, None) for n in names if n == "simpsons_mnist"]
    for name, positive in plan:
        res = bench_set(name, base, heads, out_root, positive, head_backbones)
        result["binary" if positive else "sets"].append(res)
        save()
        print_set(res)
    met = [r["dataset"] for r in result["sets"] if r["target_met"]]
    result["target_met_on"] = met
    result["load_average_end"] = os.getloadavg()
    save()
    characters = [m for m in met if m not in CSV_SETS]
    print(f"\ntarget met on {len(met)} set(s): {', '.join(met) or 'none'}; "
          f"{len(characters)} of them character set(s) (goal: at least 2)")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
