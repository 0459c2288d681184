"""Benchmark the fusion: does a rule fitted on cross-fitted probabilities beat each expert alone?

For each split seed:
1. Split museum_multimodal into a held-out quarter and the rest, stratified and grouped: rows
   sharing a normalised description or a near-duplicate photo (`museum.image.duplicates.image_groups`)
   fall on one side.
2. Train the text expert on museum/train.csv minus every row whose description is held out
   (museum_multimodal's descriptions come from there), with museum/test.csv as unlabelled text;
   train the image expert on the rest's photos. Default options unless told otherwise.
3. `cross_fit` the rest (k folds: each expert retrained without each fold), time it, and choose
   the fusion rule on the out-of-fold probabilities (`OutOfFold.choose`).
4. Score the held-out rows with the two experts: macro-F1 of text alone, image alone, the 0.7/0.7
   default cascade, every candidate rule and the chosen one, on rows with both modalities and on all.
Then average over the seeds, print a table and write bench_results/bench_cascade.json (git-ignored).

Usage: python scripts/bench_cascade.py [--seeds 0,1,2] [--folds 5] [--reuse]
Smoke run: python scripts/bench_cascade.py --seeds 0 --folds 2 --limit 160 --text-limit 600 --tiny
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from museum.config import FusionConfig, ImageConfig, TextConfig  # noqa: E402
from museum.crossfit import cross_fit, crossfit_folds  # noqa: E402
from museum.data.competition import is_safe_id, normalise_description, read_competition_csv  # noqa: E402
from museum.evaluate import score_labelled  # noqa: E402
from museum.fusion import describe_rule, format_choice  # noqa: E402
from museum.log import setup_logging  # noqa: E402
from museum.metrics import macro_f1  # noqa: E402
from museum.provenance import DATA_NAME, save_training_record, training_record  # noqa: E402
from museum.utils import write_json  # noqa: E402

DATA = Path(os.environ.get("MUSEUM_SHARED_DATA", ROOT.parent / "shared" / "data"))
TINY_TEXT = dict(epochs=1, w2v_epochs=1, w2v_dim=32, navec=False, vectors_weight=0.0, hidden=16)
TINY_IMAGE = dict(backbone="mobilenet_v3_small", epochs=1, members=1, input_size=64, weights="none", tta=False, ema=0.0)


def write_table(path: Path, table, idx) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["guid", "description", "typology"])
        for i in idx:
            writer.writerow([table.guids[i], table.descriptions[i], table.labels[i]])
    return path


def photo_groups(table, images: Path, cache: Path, device: str) -> list[dict]:
    """Near-duplicate photo groups among the rows (row indices), embeddings cached in `cache`."""
    from museum.image.duplicates import image_groups

    paths = [images / f"{g}.jpg" if is_safe_id(g) and (images / f"{g}.jpg").is_file() else None for g in table.guids]
    return image_groups(paths, cache_file=cache, device=device)


def train_experts(work: Path, table, rest, held, args, seed: int, timings: dict) -> tuple[Path, Path]:
    """The text and image experts of one split, each folder with its data.json; kept with --reuse."""
    text_dir, image_dir = work / "models" / "text", work / "models" / "image"
    held_descriptions = {normalise_description(table.descriptions[i]) for i in held} - {""}
    train = read_competition_csv(DATA / "museum" / "train.csv", require_labels=True)
    keep = [i for i, d in enumerate(train.descriptions) if normalise_description(d) not in held_descriptions]
    if args.text_limit:  # smoke runs: the rows cross-fitting must remove, plus the first others
        rest_descriptions = {normalise_description(table.descriptions[i]) for i in rest} - {""}
        overlap = [i for i in keep if normalise_description(train.descriptions[i]) in rest_descriptions]
        keep = sorted(set(overlap) | set(keep[:args.text_limit]))
    text_csv = write_table(work / "text_train.csv", train, keep)
    unlabeled = [] if args.tiny else [DATA / "museum" / "test.csv"]
    text_config = TextConfig(seed=seed, **(TINY_TEXT if args.tiny else {}))
    if args.text_epochs:
        text_config = replace(text_config, epochs=args.text_epochs)
    if not (args.reuse and (text_dir / DATA_NAME).is_file()):
        from museum.train_text import train_text_model

        start = time.perf_counter()
        train_text_model(text_csv, text_dir, text_config, unlabeled=unlabeled, progress=False)
        timings["train_text_s"] = time.perf_counter() - start
        if not (text_dir / DATA_NAME).is_file():  # trainers that predate data.json
            save_training_record(text_dir, training_record(text_csv, unlabeled=unlabeled))
    image_csv = write_table(work / "image_train.csv", table, rest)
    image_config = ImageConfig(seed=seed, device=args.device, **(TINY_IMAGE if args.tiny else {}))
    if args.image_epochs:
        image_config = replace(image_config, epochs=args.image_epochs)
    if not (args.reuse and (image_dir / DATA_NAME).is_file()):
        from museum.train_image import train_image_model

        start = time.perf_counter()
        train_image_model(image_config, args.images, image_dir, train_csv=image_csv)
        timings["train_image_s"] = time.perf_counter() - start
        if not (image_dir / DATA_NAME).is_file():
            save_training_record(image_dir, training_record(image_csv, images=args.images))
    return text_dir, image_dir


def run_seed(table, groups, args, seed: int) -> dict:
    work = args.out / "cascade" / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    timings: dict = {}
    # 1. a held-out quarter: one of four grouped stratified folds
    fold = crossfit_folds(table.labels, table.descriptions, 4, seed, extra_groups=groups)
    held, rest = np.flatnonzero(fold == 0), np.flatnonzero(fold != 0)
    rest_csv, held_csv = write_table(work / "rest.csv", table, rest), write_table(work / "held_out.csv", table, held)
    # 2. the experts
    text_dir, image_dir = train_experts(work, table, rest, held, args, seed, timings)
    overrides = {"device": args.device, "workers": 1}
    run = score_labelled(held_csv, args.images, text_dir, image_dir, overrides, use_saved_settings=False)
    classes, fallback = run.setup.cascade.classes, run.setup.cascade.fallback
    # 3. cross-fit the rest and choose the rule
    start = time.perf_counter()
    position = {int(r): j for j, r in enumerate(rest)}  # table row -> row of rest.csv
    rest_groups = [[position[m] for m in g["members"] if m in position] for g in groups]
    oof = cross_fit(rest_csv, args.images, text_dir, image_dir, n_folds=args.folds, seed=seed,
                    device=args.device, extra_groups=[g for g in rest_groups if len(g) > 1])
    timings["cross_fit_s"] = time.perf_counter() - start
    if oof.classes != classes:
        raise SystemExit(f"cross-fit classes {oof.classes} differ from the experts' {classes}")
    choice = oof.choose(FusionConfig(seed=seed), fallback)
    # 4. held-out rows
    s, y = run.scores, run.labels
    both = np.flatnonzero(s.has_text & s.has_image)
    systems = {"text alone": run.single("text"), "image alone": run.single("image"),
               "default cascade 0.7/0.7": run.result.labels(classes)}
    for name, rule in choice.candidates.items():
        if name != "default":
            systems[f"{name} (fitted out of fold)"] = rule.combine(s.text_p, s.image_p, s.has_text, s.has_image).labels(classes)
    systems[f"chosen: {choice.name}"] = choice.rule.combine(s.text_p, s.image_p, s.has_text, s.has_image).labels(classes)
    rows = {name: {"both": macro_f1([y[i] for i in both], [pred[i] for i in both]) if both.size else float("nan"),
                   "all": macro_f1(y, pred)} for name, pred in systems.items()}
    return {"seed": seed, "rows": rows, "n_held": len(y), "n_both": int(both.size), "n_rest": len(rest),
            "choice": choice.to_dict(), "chosen_rule": describe_rule(choice.rule), "choice_text": format_choice(choice),
            "cross_fit": {"seconds": oof.seconds, "reused": oof.reused, "per_fold": oof.timings,
                          "summary": oof.summary()}, "timings": timings}


def dominant(result: dict) -> str:
    """Where the cross-fit's time went (train / predict per expert, Word2Vec inside text training)."""
    parts: dict[str, float] = {}
    for kind, folds in result["cross_fit"]["per_fold"].items():
        parts[f"{kind} training"] = sum(t.get("train_s", 0.0) for t in folds)
        parts[f"{kind} prediction"] = sum(t.get("predict_s", 0.0) for t in folds)
        if kind == "text":
            parts["(of which Word2Vec)"] = sum(t.get("word2vec_s", 0.0) for t in folds)
    total = result["cross_fit"]["seconds"]
    return ", ".join(f"{k} {v:.0f} s ({v / max(total, 1e-9):.0%})" for k, v in parts.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="Split seeds (also the models' and folds' seeds).")
    parser.add_argument("--folds", type=int, default=5, help="Cross-fitting folds.")
    parser.add_argument("--text-epochs", type=int, default=0, help="BiLSTM epochs (0 = the default).")
    parser.add_argument("--image-epochs", type=int, default=0, help="Image epochs (0 = auto).")
    parser.add_argument("--limit", type=int, default=0, help="Use only the first N museum_multimodal rows (smoke runs).")
    parser.add_argument("--text-limit", type=int, default=0, help="Text expert: the overlapping rows plus N others (smoke runs).")
    parser.add_argument("--tiny", action="store_true", help="Tiny configurations (smoke runs; scores mean nothing).")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results")
    parser.add_argument("--reuse", action="store_true", help="Keep models (and cross-fits) from an earlier run.")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    setup_logging()
    mm = DATA / "museum_multimodal"
    args.images = mm / "images"
    table = read_competition_csv(mm / "train.csv", require_labels=True)
    if args.limit:
        table = table.subset(range(min(args.limit, len(table))))
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    groups = photo_groups(table, args.images, args.out / f"mm_embeddings_{len(table)}.npz", args.device)
    group_s = time.perf_counter() - start
    results = [run_seed(table, groups, args, seed) for seed in seeds]

    names = list(results[0]["rows"])
    chosen_name = next(n for n in names if n.startswith("chosen"))
    lines = [f"museum_multimodal held-out quarters (grouped by description and {len(groups)} photo duplicate group(s)), "
             f"split seeds {seeds}: {', '.join(str(r['n_held']) for r in results)} rows "
             f"({', '.join(str(r['n_both']) for r in results)} with both); cross-fit on the rest, {args.folds} folds",
             f"{'system':<34}{'both (mean)':>12}{'all (mean)':>12}   per seed both / all"]
    for name in names:
        if name.startswith("chosen"):
            continue
        both = [r["rows"][name]["both"] for r in results if name in r["rows"]]
        everything = [r["rows"][name]["all"] for r in results if name in r["rows"]]
        per_seed = "  ".join(f"{b:.3f}/{a:.3f}" for b, a in zip(both, everything))
        lines.append(f"{name:<34}{np.mean(both):>12.4f}{np.mean(everything):>12.4f}   {per_seed}")
    chosen = [next(v for k, v in r["rows"].items() if k.startswith("chosen")) for r in results]
    lines.append(f"{'chosen rule (per seed)':<34}{np.mean([c['both'] for c in chosen]):>12.4f}"
                 f"{np.mean([c['all'] for c in chosen]):>12.4f}   "
                 + "  ".join(f"{c['both']:.3f}/{c['all']:.3f}" for c in chosen))
    for r in results:
        lines.append(f"seed {r['seed']}: chose {r['choice']['name']} ({r['chosen_rule']}); "
                     f"inner-CV estimate {r['choice']['chosen_f1']:.4f} vs default {r['choice']['default_f1']:.4f}")
        lines.append(f"  cross-fit {r['cross_fit']['seconds']:.0f} s wall"
                     + (" (reused)" if r["cross_fit"]["reused"] else f": {dominant(r)}"))
        lines.append("  experts: " + ", ".join(f"{k} {v:.0f} s" for k, v in r["timings"].items()))
    lines.append(f"photo duplicate groups: {group_s:.0f} s (embeddings cached)")
    report = "\n".join(lines)
    print(report)
    write_json(args.out / "bench_cascade.json", {
        "results": results, "seeds": seeds, "folds": args.folds, "limit": args.limit, "text_limit": args.text_limit,
        "tiny": args.tiny, "photo_groups": len(groups), "report": report, "chosen_key": chosen_name,
    })


if __name__ == "__main__":
    main()
