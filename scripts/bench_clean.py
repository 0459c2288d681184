"""Measure `museum clean`: does it find injected label flips, and does cleaning help?

1. Text: flip 5 % of the labels of ../shared/data/museum/train.csv at random (each to another
   class, uniformly), compute 5-fold out-of-fold probabilities with the fast text expert, run the
   audit, and score the flagged rows against the flips. The real file has label errors of its
   own (photographs filed as documents, coins as "other"...), which the audit also flags and
   which count as false positives here; so a second figure leaves out the rows the same audit
   flags on the original labels (pre-existing suspects, whose truth is unknown). A third figure
   ranks rows by label-quality score alone: precision (= recall) of the len(flips) lowest, and
   how many of its non-flips were pre-existing suspects.
2. Images: the same on a character set (default simpsons_small), with the embedding head.
3. Cleaning for real: a stratified 80/20 split of the real train.csv (seed 0). The audit runs on
   the training part only; the TF-IDF expert is trained on it as is, with flagged rows dropped,
   and with them relabelled, and all three are scored on the same untouched validation part.

Usage: python scripts/bench_clean.py [--expert fast|full] [--set simpsons_small] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from museum.clean import AuditItems, find_issues, load_items, out_of_fold  # noqa: E402
from museum.data.competition import stratified_split  # noqa: E402
from museum.metrics import macro_f1  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def flip(labels: list[str], share: float, rng: np.random.Generator) -> tuple[list[str], set[int]]:
    classes = sorted(set(labels))
    idx = rng.choice(len(labels), size=int(round(share * len(labels))), replace=False)
    out = list(labels)
    for i in idx:
        others = [c for c in classes if c != out[i]]
        out[i] = others[rng.integers(len(others))]
    return out, set(int(i) for i in idx)


def score(flagged: set[int], flips: set[int], universe: set[int] | None = None) -> dict:
    if universe is not None:
        flagged, flips = flagged & universe, flips & universe
    tp = len(flagged & flips)
    return {"precision": tp / max(len(flagged), 1), "recall": tp / max(len(flips), 1), "flagged": len(flagged),
            "flips": len(flips)}


def flip_benchmark(items: AuditItems, name: str, expert: str, seed: int, cache: Path | None) -> dict:
    rng = np.random.default_rng(seed)
    original = list(items.labels)
    start = time.perf_counter()
    suspects = {d["index"] for d in find_issues(original, out_of_fold(items, 5, seed, expert, cache))[0]}
    items.labels, flips = flip(original, 0.05, rng)
    issues, quality = find_issues(items.labels, out_of_fold(items, 5, seed, expert, cache))
    seconds = time.perf_counter() - start
    flagged = {d["index"] for d in issues}
    # Ranking quality apart from the flag rule: the len(flips) lowest-scored rows, and how many of
    # the non-flips among them the audit of the original labels had already flagged.
    top = set(np.argsort(np.nan_to_num(quality, nan=np.inf), kind="stable")[:len(flips)].tolist())
    res = {"rows": len(original), "all_rows": score(flagged, flips),
           "without_preexisting_suspects": score(flagged, flips, set(range(len(original))) - suspects),
           "top_k_by_score": {**score(top, flips), "non_flips": len(top - flips),
                              "non_flips_preexisting_suspects": len((top - flips) & suspects)},
           "preexisting_suspects": len(suspects), "seconds_two_audits": round(seconds, 1)}
    items.labels = original
    for key in ("all_rows", "without_preexisting_suspects"):
        r = res[key]
        print(f"{name} [{key}]: precision {r['precision']:.3f}  recall {r['recall']:.3f}  "
              f"({r['flagged']} flagged, {r['flips']} flips)", flush=True)
    r = res["top_k_by_score"]
    print(f"{name} [lowest {r['flagged']} scores]: precision = recall {r['precision']:.3f}; of its {r['non_flips']} "
          f"non-flips, {r['non_flips_preexisting_suspects']} were flagged on the original labels too", flush=True)
    return res


def cleaning_benchmark(expert: str, seed: int) -> dict:
    from museum.text.tfidf import TfidfExpert

    items = load_items(SHARED / "museum" / "train.csv", None)
    train_idx, val_idx = stratified_split(items.labels, 0.2, seed)
    part = AuditItems(items.source, [items.ids[i] for i in train_idx], [items.labels[i] for i in train_idx],
                      texts=[items.texts[i] for i in train_idx])
    issues, _ = find_issues(part.labels, out_of_fold(part, 5, seed, expert))
    change = {d["index"]: d["suggested"] for d in issues}
    val_texts, val_labels = [items.texts[i] for i in val_idx], [items.labels[i] for i in val_idx]
    variants = {
        "uncleaned": (part.texts, part.labels),
        "dropped": ([t for i, t in enumerate(part.texts) if i not in change],
                    [y for i, y in enumerate(part.labels) if i not in change]),
        "relabelled": (part.texts, [change.get(i, y) for i, y in enumerate(part.labels)]),
    }
    res = {"train_rows": len(part.labels), "flagged": len(issues), "val_rows": len(val_idx)}
    for name, (texts, labels) in variants.items():
        np.random.seed(seed)
        model = TfidfExpert(seed=seed).fit(list(texts), list(labels))
        pred = [model.classes_[i] for i in model.predict_proba(val_texts).argmax(1)]
        res[name] = {"macro_f1": macro_f1(val_labels, pred),
                     "accuracy": float(np.mean([p == y for p, y in zip(pred, val_labels)]))}
        print(f"train.csv {name:<11} ({len(labels)} rows): validation macro-F1 {res[name]['macro_f1']:.4f}  "
              f"accuracy {res[name]['accuracy']:.4f}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--expert", default="fast", choices=("fast", "full"))
    ap.add_argument("--set", default="simpsons_small")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=ROOT / "bench_results" / "bench_clean.json")
    args = ap.parse_args()
    results = {"expert": args.expert, "seed": args.seed}
    results["text_flips"] = flip_benchmark(load_items(SHARED / "museum" / "train.csv", None), "train.csv",
                                           args.expert, args.seed, None)
    cache = Path(tempfile.gettempdir()) / f"museum-bench-embeddings-{args.set}.npz"  # not a result: keep it out of the repo
    results["image_flips"] = flip_benchmark(load_items(None, SHARED / "characters" / args.set), args.set,
                                            args.expert, args.seed, cache)
    results["cleaning"] = cleaning_benchmark(args.expert, args.seed)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
