"""Benchmark the text expert: 5-fold stratified CV on the competition train.csv, repeated.

Every model sees the same folds. For each: macro-F1, accuracy, train seconds, predict rows/s
(best of 5 calls on the fold's test part, median over folds).
  1. baseline: TF-IDF word (1–2) + char_wb (2–5), sublinear tf, LinearSVC(C=0.5, balanced)
  2. plain Word2Vec + BiLSTM (no navec, no TF-IDF expert)
  3. the shipped default TextModel

The whole CV runs once per seed in --seeds (default 0,1,2): the seed draws the folds and seeds
the models. One 5-fold run was not enough to judge a change: the default's lead over the
baseline was +0.024 with fold seed 0 and +0.004 / +0.005 with seeds 1 / 2, and most settings
had been chosen on seed 0's folds. The table averages every fold of every seed.

Usage: python scripts/bench_text.py [--folds 5] [--seeds 0,1,2] [--models baseline,plain,default]
       [--set field=value ...] (override TextConfig fields of the default model, for experiments)
Prints a table and writes bench_results/bench_text.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from museum.config import TextConfig, config_to_dict  # noqa: E402
from museum.data.competition import read_competition_csv, stratified_folds, stratified_split  # noqa: E402
from museum.log import setup_logging  # noqa: E402
from museum.metrics import classification_metrics  # noqa: E402
from museum.text.model import TextModel  # noqa: E402
from museum.utils import write_json  # noqa: E402

DEFAULT_TRAIN = ROOT.parent / "shared" / "data" / "museum" / "train.csv"
DEFAULT_UNLABELED = ROOT.parent / "shared" / "data" / "museum" / "test.csv"


class Baseline:
    """The strongest public approach of the competition, as the issue specifies it."""

    def fit(self, texts, labels, *_args, **_kwargs):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.pipeline import make_pipeline, make_union
        from sklearn.svm import LinearSVC

        features = make_union(
            TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
            TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True),
        )
        self.pipeline = make_pipeline(features, LinearSVC(C=0.5, class_weight="balanced")).fit(texts, labels)
        return self

    def predict(self, texts):
        return list(self.pipeline.predict(texts))


def parse_overrides(pairs: list[str]) -> dict:
    out = {}
    fields = TextConfig.__dataclass_fields__
    for pair in pairs:
        key, _, raw = pair.partition("=")
        if key not in fields:
            raise SystemExit(f"--set {pair}: unknown TextConfig field {key}")
        out[key] = json.loads(raw) if raw not in ("", "None") else None
    return out


PREDICT_REPEATS = 5


def run_model(name, make, table, folds, extra):
    scores, accs, fit_s, rates, per_fold = [], [], [], [], []
    for k, (tr, te) in enumerate(folds):
        train, test = table.subset(tr), table.subset(te)
        start = time.perf_counter()
        if name == "baseline":
            model = make().fit(train.descriptions, train.labels)
        else:  # an inner stratified split of the fold's training part drives early stopping and the blend
            inner_tr, inner_val = stratified_split(train.labels, 0.15, seed=k)
            a, b = train.subset(inner_tr), train.subset(inner_val)
            model = make().fit(a.descriptions, a.labels, b.descriptions, b.labels, extra, progress=False)
        fit_s.append(time.perf_counter() - start)
        model.predict(test.descriptions[:64])  # warm-up: first calls pay one-off allocation costs
        # Best of PREDICT_REPEATS calls (as timeit does): on this shared 2-core machine one call of a
        # fifth of a second varied 2–3× from run to run, which measured the machine, not the model.
        seconds = []
        for _ in range(PREDICT_REPEATS):
            start = time.perf_counter()
            predicted = model.predict(test.descriptions)
            seconds.append(time.perf_counter() - start)
        rates.append(len(test) / min(seconds))
        m = classification_metrics(test.labels, predicted, sorted(set(table.labels)))
        scores.append(m["macro_f1"])
        accs.append(m["accuracy"])
        fold_info = {"fold": k, "macro_f1": m["macro_f1"], "accuracy": m["accuracy"], "fit_seconds": fit_s[-1]}
        if hasattr(model, "blend_weights_"):
            fold_info.update({f"weight_{expert}": w for expert, w in model.blend_weights_.items()})
            fold_info["best_epoch"] = model.best_epoch_
            for expert, p in model.expert_probas(test.descriptions).items():
                fold_info[f"{expert}_macro_f1"] = classification_metrics(test.labels, [model.classes_[i] for i in p.argmax(1)])["macro_f1"]
        per_fold.append(fold_info)
        print(f"  {name} fold {k}: macro-F1 {m['macro_f1']:.4f}  " + " ".join(
            f"{key}={value:.3f}" for key, value in fold_info.items() if key not in ("fold", "macro_f1", "accuracy") and isinstance(value, float)), flush=True)
    return {
        "macro_f1": float(np.mean(scores)), "macro_f1_std": float(np.std(scores)), "accuracy": float(np.mean(accs)),
        "train_seconds": float(np.mean(fit_s)), "predict_rows_per_s": float(np.median(rates)), "folds": per_fold,
    }


def parse_seeds(raw: str) -> list[int]:
    try:
        seeds = [int(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--seeds {raw}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or min(seeds) < 0:
        raise SystemExit(f"--seeds {raw}: expected one or more integers >= 0")
    return seeds


def pooled(runs: dict[int, dict]) -> dict:
    """Every fold of every seed as one sample: mean and std of macro-F1, mean accuracy and train
    seconds, median predict rate."""
    folds = [f for run in runs.values() for f in run["folds"]]
    return {
        "macro_f1": float(np.mean([f["macro_f1"] for f in folds])),
        "macro_f1_std": float(np.std([f["macro_f1"] for f in folds])),
        "accuracy": float(np.mean([f["accuracy"] for f in folds])),
        "train_seconds": float(np.mean([f["fit_seconds"] for f in folds])),
        "predict_rows_per_s": float(np.median([r["predict_rows_per_s"] for r in runs.values()])),
        "folds": len(folds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, default=DEFAULT_TRAIN)
    parser.add_argument("--unlabeled", type=Path, default=DEFAULT_UNLABELED)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", default="0,1,2", help="fold seeds, comma-separated; the CV runs once per seed")
    parser.add_argument("--models", default="baseline,plain,default")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "bench_text.json")
    args = parser.parse_args()
    seeds = parse_seeds(args.seeds)
    setup_logging()
    import logging
    logging.getLogger("museum").setLevel(logging.WARNING)

    table = read_competition_csv(args.train, require_labels=True)
    extra = read_competition_csv(args.unlabeled).descriptions if args.unlabeled and args.unlabeled.exists() else []
    overrides = parse_overrides(args.overrides)
    names = args.models.split(",")
    runs: dict[str, dict[int, dict]] = {name: {} for name in names}
    for seed in seeds:
        folds = stratified_folds(table.labels, args.folds, seed)
        makers = {
            "baseline": Baseline,
            "plain": lambda: TextModel(replace(TextConfig(seed=seed), navec=False, tfidf=False, vectors_weight=0.0)),
            "default": lambda: TextModel(replace(TextConfig(seed=seed), **overrides)),
        }
        for name in names:
            print(f"{name}, fold seed {seed} …", flush=True)
            runs[name][seed] = run_model(name, makers[name], table, folds, extra)
    results = {name: pooled(by_seed) for name, by_seed in runs.items()}
    base = results.get("baseline", {}).get("macro_f1")
    print(f"\n{args.folds}-fold CV × {len(seeds)} fold seed(s) ({', '.join(map(str, seeds))}): {args.folds * len(seeds)} folds per model")
    print(f"{'model':<10} {'macro-F1':>9} {'± std':>7} {'vs base':>8} {'accuracy':>9} {'train s':>8} {'predict rows/s':>15}")
    for name, r in results.items():
        ratio = f"{r['macro_f1'] / base:7.3f}x" if base else "       -"
        print(f"{name:<10} {r['macro_f1']:9.4f} {r['macro_f1_std']:7.4f} {ratio:>8} {r['accuracy']:9.4f} "
              f"{r['train_seconds']:8.1f} {r['predict_rows_per_s']:15.0f}")
    lead = None
    if base and "default" in results:
        per_seed = {seed: runs["default"][seed]["macro_f1"] - runs["baseline"][seed]["macro_f1"] for seed in seeds}
        per_fold = [d["macro_f1"] - b["macro_f1"] for seed in seeds
                    for d, b in zip(runs["default"][seed]["folds"], runs["baseline"][seed]["folds"])]
        lead = {"mean": results["default"]["macro_f1"] - base, "per_seed": per_seed,
                "folds_ahead": sum(x > 0 for x in per_fold), "folds": len(per_fold)}
        print(f"default − baseline: {lead['mean']:+.4f} macro-F1 (per fold seed: "
              + ", ".join(f"{s}: {v:+.4f}" for s, v in per_seed.items())
              + f"; ahead on {lead['folds_ahead']} of {lead['folds']} folds)")
    write_json(args.out, {"folds": args.folds, "seeds": seeds, "overrides": overrides,
                          "default_config": config_to_dict(replace(TextConfig(seed=seeds[0]), **overrides)),
                          "results": results, "default_minus_baseline": lead,
                          "runs": {name: {str(s): r for s, r in by_seed.items()} for name, by_seed in runs.items()}})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
