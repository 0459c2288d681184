"""Benchmark the cascade in one run: does fusing text and image beat each expert alone?

1. Split museum_multimodal (stratified, seeded) into image-train / validation / held-out.
2. Train the text expert on museum/train.csv *minus* every row whose description appears
   in the validation or held-out part (museum_multimodal's text is taken from train.csv,
   so keeping them would let the text expert score memorised rows).
3. Train each image expert on the image-train part: the fine-tuned CNN and the logistic head on
   frozen embeddings (`--image-heads`).
4. On held-out rows: macro-F1 of text-only, image-only and the cascade, on rows with both
   modalities and on all rows; the 0.7/0.7 defaults against settings tuned on validation.
5. Time `museum submit ../shared/data/museum/test.csv` (with the first image expert) and check it
   against sample_submission.csv.

Prints a table and writes bench_results/bench_cascade.json (git-ignored).
Usage: python scripts/bench_cascade.py [--image-epochs 6] [--text-epochs 15] [--image-heads finetune,logreg] [--reuse]
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from museum.config import FusionConfig, ImageConfig, TextConfig  # noqa: E402
from museum.data.competition import normalise_description, read_competition_csv, stratified_split  # noqa: E402
from museum.evaluate import score_labelled  # noqa: E402
from museum.fusion import ROUTES, Cascade, tune_cascade  # noqa: E402
from museum.log import setup_logging  # noqa: E402
from museum.metrics import macro_f1  # noqa: E402
from museum.submit import check_submission  # noqa: E402
from museum.utils import write_json  # noqa: E402

DATA = Path(os.environ.get("MUSEUM_SHARED_DATA", ROOT.parent / "shared" / "data"))


def write_table(path: Path, table, idx) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["guid", "description", "typology"])
        for i in idx:
            writer.writerow([table.guids[i], table.descriptions[i], table.labels[i]])
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-epochs", type=int, default=6)
    parser.add_argument("--text-epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results")
    parser.add_argument("--image-heads", default="finetune,logreg",
                        help="Image experts to compare, comma-separated `train-image --head` values; submit uses the first.")
    parser.add_argument("--reuse", action="store_true", help="Reuse models from an earlier run of this script.")
    args = parser.parse_args()
    heads = [h.strip() for h in args.image_heads.split(",") if h.strip()]
    if not heads:
        parser.error("--image-heads: name at least one of finetune, logreg, svm, mlp, knn")
    setup_logging()
    work = args.out / "cascade"
    work.mkdir(parents=True, exist_ok=True)
    mm = DATA / "museum_multimodal"
    timings: dict[str, float] = {}

    # 1. splits
    table = read_competition_csv(mm / "train.csv", require_labels=True)
    rest, held = stratified_split(table.labels, 0.25, args.seed)
    rest_labels = [table.labels[i] for i in rest]
    fit_pos, val_pos = stratified_split(rest_labels, 0.25, args.seed)
    image_train, valid = rest[fit_pos], rest[val_pos]
    paths = {name: write_table(work / f"{name}.csv", table, idx)
             for name, idx in (("image_train", image_train), ("valid", valid), ("held_out", held))}

    # 2. text expert without the descriptions we measure on
    text_dir = work / "models" / "text"
    train = read_competition_csv(DATA / "museum" / "train.csv", require_labels=True)
    measured = {normalise_description(table.descriptions[i]) for i in np.concatenate([valid, held])} - {""}
    keep = [i for i, d in enumerate(train.descriptions) if normalise_description(d) not in measured]
    text_train = write_table(work / "text_train.csv", train, keep)
    if not (args.reuse and (text_dir / "text_model.pt").exists()):
        from museum.text.train import train_text_model

        start = time.perf_counter()
        train_text_model(text_train, text_dir, TextConfig(seed=args.seed, epochs=args.text_epochs), progress=False)
        timings["train_text_s"] = time.perf_counter() - start

    # 3.–4. per image expert (fine-tuned CNN and/or an embedding head): train, score validation and
    # held-out rows once, route them under default and tuned settings
    overrides = {"device": "cpu", "workers": 1}
    image_dirs = {head: work / "models" / f"image_{head}" for head in heads}
    systems, routes, tunings = {}, {}, {}
    for head, head_dir in image_dirs.items():
        if not (args.reuse and (head_dir / "best.pt").exists()):
            from museum.image.train import train_image_model

            start = time.perf_counter()
            train_image_model(replace(ImageConfig(), seed=args.seed, epochs=args.image_epochs, head=head), mm / "images",
                              head_dir, train_csv=paths["image_train"])
            timings[f"train_image_{head}_s"] = time.perf_counter() - start
        val_run = score_labelled(paths["valid"], mm / "images", text_dir, head_dir, overrides, use_saved_settings=False)
        held_run = score_labelled(paths["held_out"], mm / "images", text_dir, head_dir, overrides, use_saved_settings=False)
        classes, fallback = held_run.setup.cascade.classes, held_run.setup.cascade.fallback
        y_val = np.array([classes.index(c) for c in val_run.labels])
        tuned = tune_cascade(val_run.scores.text_p, val_run.scores.image_p, val_run.scores.has_text,
                             val_run.scores.has_image, y_val, classes, fallback, FusionConfig())
        tunings[head] = tuned
        s, y = held_run.scores, held_run.labels
        both = s.has_text & s.has_image
        settings = {"default 0.7/0.7/0.5": FusionConfig(), "tuned on validation": FusionConfig(
            text_threshold=tuned.chosen[0], image_threshold=tuned.chosen[1], blend_weight=tuned.chosen[2])}
        systems.setdefault("text-only", held_run.single("text"))
        systems[f"image-only ({head})"] = held_run.single("image")
        for name, config in settings.items():
            result = Cascade.from_config(classes, replace(config, fallback=fallback)).combine(
                s.text_p, s.image_p, s.has_text, s.has_image)
            systems[f"cascade ({head}), {name}"] = result.labels(classes)
            routes[f"{head}, {name}"] = {r: int((result.routes == i).sum()) for i, r in enumerate(ROUTES)}
    rows = {}
    for name, pred in systems.items():
        rows[name] = {
            "both_modalities": macro_f1([y[i] for i in np.flatnonzero(both)], [pred[i] for i in np.flatnonzero(both)]),
            "all_rows": macro_f1(y, pred),
        }

    # 5. the competition test file through the CLI, timed from a cold process
    submission = work / "submission.csv"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "museum", "submit", str(DATA / "museum" / "test.csv"),
                           "--text-model", str(text_dir), "--image-model", str(image_dirs[heads[0]]), "--out", str(submission),
                           "--settings", str(work / "no-settings.json")],
                          cwd=ROOT, capture_output=True, text=True)
    submit_s = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"museum submit failed:\n{proc.stderr[-2000:]}")
    problems = check_submission(submission, DATA / "museum" / "sample_submission.csv", classes)

    n_both, n_all = int(both.sum()), len(y)
    lines = [f"held-out museum_multimodal rows: {n_all} ({n_both} with text and image); "
             f"validation rows for tuning: {len(y_val)}",
             f"{'system':<42}{'both (n=' + str(n_both) + ')':>14}{'all (n=' + str(n_all) + ')':>14}"]
    for name, r in rows.items():
        lines.append(f"{name:<42}{r['both_modalities']:>14.4f}{r['all_rows']:>14.4f}")
    for head, tuned in tunings.items():
        lines.append(f"tuned setting ({head}): text>{tuned.chosen[0]} image>{tuned.chosen[1]} w={tuned.chosen[2]} "
                     f"({tuned.reason})")
    for name, r in routes.items():
        lines.append(f"routes, {name}: " + ", ".join(f"{k} {v}" for k, v in r.items()))
    lines.append(f"museum submit test.csv: {submit_s:.1f} s, check against sample_submission: "
                 + ("OK" if not problems else "; ".join(problems)))
    report = "\n".join(lines)
    print(report)
    write_json(args.out / "bench_cascade.json", {
        "rows": rows, "routes": routes, "tuning": {h: asdict(t) for h, t in tunings.items()}, "n_held_out": n_all, "n_both": n_both,
        "n_valid": len(y_val), "submit_seconds": submit_s, "submission_problems": problems,
        "submit_summary": proc.stdout, "timings": timings, "text_train_rows": len(keep),
        "text_rows_removed_for_leakage": len(train) - len(keep), "seed": args.seed,
        "image_epochs": args.image_epochs, "image_heads": heads, "report": report,
    })


if __name__ == "__main__":
    main()
