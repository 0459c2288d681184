"""Benchmark the image expert: input-pipeline speed and accuracy per character set.

Speed (images/s, training and inference, MobileNetV2 at the default input size):
  (a) plain torchvision ImageFolder + DataLoader with PIL transforms (decodes every epoch),
  (b) the shipped pipeline from epoch 2 on (decoded-once uint8 cache + batched augmentation),
  (c) the model alone on float tensors already in memory: the compute limit.
Accuracy: `train_image_model` with default options on each set (stratified 80/20 split),
with the best validation macro-F1 and the wall seconds of the whole run. `--seeds 0,1,2`
trains once per split seed (the seed draws the split, initialisation and augmentation) and
adds each set's mean: on ~90 validation images one image moves macro-F1 by ~0.01.

    python scripts/bench_image.py [--quick] [--datasets simpsons_small,quintuplets] [--seeds 0] [--merge]

Prints tables and writes bench_results/bench_image.json. With `--merge` the rows of (set, seed)
pairs not run this time are kept from that file, so slow sets can be re-run (or run in parallel) alone.

`--backbones offline` (or a comma-separated list such as mobilenet_v2,tf_efficientnet_lite0)
compares backbones instead: `train_image_model` with default options for each backbone, set
(the four character sets and museum_multimodal by default) and split seed; it prints mean
macro-F1 and training seconds per set and backbone and writes bench_results/bench_image_backbones.json.
`offline` means every backbone whose ImageNet weights an installed package ships (mobilenet_v2,
tf_efficientnet_lite0/1/2). A plain name trains every ensemble member on that backbone; `A+B` is a mixed
ensemble, members alternating A and B (train-image's default is tf_efficientnet_lite2+mobilenet_v2 on sets
small enough for four members). The full grid takes hours on two shared cores:

    python scripts/bench_image.py --backbones offline --seeds 0,1,2 --threads 1
    python scripts/bench_image.py --backbones offline --datasets quintuplets_faces --quick   # a smoke run
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from museum.config import ImageConfig, config_to_dict  # noqa: E402
from museum.data.images import decode_cache, list_image_folder  # noqa: E402
from museum.engine import predict_logits, train_one_epoch  # noqa: E402
from museum.image.augment import augment, normalize  # noqa: E402
from museum.image.backbones import IMAGENET_MEAN, IMAGENET_STD, build_backbone, head_parameter_names  # noqa: E402
from museum.image.weights import PACKAGED, packaged_file  # noqa: E402
from museum.train_image import train_image_model  # noqa: E402
from museum.log import setup_logging  # noqa: E402
from museum.utils import write_json  # noqa: E402

SHARED = Path(os.environ.get("MUSEUM_SHARED_DATA", ROOT.parent / "shared" / "data"))
DATA = SHARED / "characters"
DATASETS = ["simpsons_small", "quintuplets_faces", "quintuplets", "simpsons_mnist"]
MULTIMODAL = "museum_multimodal"  # guid/typology CSV + images/: the museum photos
TARGETS = {"simpsons_small": 0.92, "quintuplets_faces": 0.97, "quintuplets": 0.85, "simpsons_mnist": 0.90}
# Issue #18's targets for the default backbone: validation macro-F1, mean over split seeds 0/1/2.
BACKBONE_TARGETS = {"simpsons_small": 0.97, "quintuplets_faces": 0.98, "quintuplets": 0.93, "simpsons_mnist": 0.93,
                    MULTIMODAL: 0.78}


def _model(n_classes: int, trainable: float):
    """The trainer's network and optimiser set-up (ImageNet weights, top layers trainable)."""
    net, _ = build_backbone("mobilenet_v2", n_classes, "imagenet")
    head = head_parameter_names(net)
    body = [n for n, _ in net.named_parameters() if n not in head]
    fixed = set(body[: int(round(len(body) * (1 - trainable)))])
    for name, p in net.named_parameters():
        p.requires_grad_(name not in fixed)
    net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    return net, opt


def _rate(fn) -> float:
    start = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - start)


def speed(root: Path, size: int, n_batches: int, batch: int = 32, rounds: int = 2) -> dict:
    from torchvision import datasets, transforms

    items = list_image_folder(root)
    classes = sorted(set(items.labels))
    col = {c: i for i, c in enumerate(classes)}
    n = min(len(items), n_batches * batch)
    paths, y = items.paths[:n], torch.tensor([col[l] for l in items.labels[:n]])
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    cl = lambda x: x.contiguous(memory_format=torch.channels_last)  # noqa: E731
    net, opt = _model(len(classes), ImageConfig.trainable)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loss = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)

    norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    plain_train = datasets.ImageFolder(str(root), transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.35, 1)), transforms.RandomHorizontalFlip(),
        transforms.ColorJitter(0.3, 0.3, 0.3), transforms.ToTensor(), norm]))
    plain_eval = datasets.ImageFolder(str(root), transforms.Compose([
        transforms.Resize((size, size)), transforms.ToTensor(), norm]))
    subset = list(range(n))

    def plain_loader(ds, shuffle):
        sub = torch.utils.data.Subset(ds, subset)
        return torch.utils.data.DataLoader(sub, batch_size=batch, shuffle=shuffle, num_workers=2)

    cache, ok, _ = decode_cache(paths, size, num_workers=2)
    floats = cl(normalize(cache, mean, std))

    def cached_batches(data):
        order = torch.randperm(n, generator=gen)
        return ((data[order[i:i + batch]], y[order[i:i + batch]]) for i in range(0, n, batch))

    runs = {
        ("train", "a"): lambda: train_one_epoch(net, plain_loader(plain_train, True), loss, opt, sched, "cpu", cl)["images"],
        ("train", "b"): lambda: train_one_epoch(net, cached_batches(cache), loss, opt, sched, "cpu",
                                                lambda x: cl(augment(x, size, gen, 0.35, 0.3, mean, std)))["images"],
        ("train", "c"): lambda: train_one_epoch(net, cached_batches(floats), loss, opt, sched, "cpu", lambda x: x)["images"],
        ("inference", "a"): lambda: len(predict_logits(net, plain_loader(plain_eval, False), "cpu", cl)),
        ("inference", "b"): lambda: len(predict_logits(net, cached_batches(cache), "cpu", lambda x: cl(normalize(x, mean, std)))),
        ("inference", "c"): lambda: len(predict_logits(net, cached_batches(floats), "cpu", lambda x: x)),
    }
    rates = {k: 0.0 for k in runs}
    for _ in range(rounds):  # interleaved rounds, best kept: other processes on the machine add noise
        for key, fn in runs.items():
            rates[key] = max(rates[key], _rate(fn))
    return {f"{phase}_{which}": round(r, 1) for (phase, which), r in rates.items()} | {"images": n, "size": size}


def accuracy(name: str, quick: bool, out_root: Path, threads: int, seed: int = 0,
             backbone: str | None = None) -> dict:
    config = ImageConfig(epochs=2 if quick else 0, threads=threads, seed=seed)  # train-image's defaults
    if backbone is not None:  # "A+B": a mixed ensemble (--backbone A --mix-backbone B); "A": every member is A
        first, _, mixed = backbone.partition("+")
        config = replace(config, backbone=first, mix_backbone=mixed or "none")
    else:
        backbone = config.backbone + (f"+{config.mix_backbone}" if config.mix_backbone != "none" else "")
    out = out_root / (name if seed == 0 else f"{name}-seed{seed}")
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)  # a stopped benchmark's: start afresh
    start = time.perf_counter()
    if name == MULTIMODAL:
        model = train_image_model(config, SHARED / name / "images", out, train_csv=SHARED / name / "train.csv")
    else:
        model = train_image_model(config, DATA / name, out)
    seconds = time.perf_counter() - start
    val = model.report_["validation"]
    return {"dataset": name, "seed": seed, "backbone": backbone,
            "macro_f1": round(val["macro_f1"], 4), "accuracy": round(val["accuracy"], 4),
            "target": TARGETS.get(name), "best_epoch": model.epoch, "epochs_run": len(model.report_["history"]),
            "input_size": model.input_size, "members": model.report_.get("resolved", {}).get("members"),
            "seconds": round(seconds, 1),
            "load_average_1min_at_end": round(os.getloadavg()[0], 2)}  # > CPUs: other jobs slowed this run


def offline_backbones() -> list[str]:
    """Backbones whose ImageNet weights an installed package ships (no network, no cache needed)."""
    return [name for name in PACKAGED if packaged_file(name) is not None]


def _table_order(runs: list[dict], backbones: list[str], datasets: list[str]) -> tuple[list[str], list[str]]:
    """Columns and rows in one order whichever process wrote last: packaged backbones, then others as met;
    the sets as DATASETS, then museum_multimodal, then others."""
    def order(key: str, known: list[str], asked: list[str]) -> list[str]:
        seen = [r[key] for r in runs]
        return list(dict.fromkeys([*(k for k in known if k in seen), *asked, *seen]))

    return order("backbone", list(PACKAGED), backbones), order("dataset", [*DATASETS, MULTIMODAL], datasets)


def _summarise(runs: list[dict], backbones: list[str], datasets: list[str]) -> dict:
    """Mean macro-F1 and training seconds per (set, backbone) over the seeds run, and the spread."""
    summary = {}
    for name in datasets:
        for backbone in backbones:
            rows = [r for r in runs if r["dataset"] == name and r["backbone"] == backbone]
            if rows:
                f1 = [r["macro_f1"] for r in rows]
                summary.setdefault(name, {})[backbone] = {
                    "seeds": [r["seed"] for r in rows], "macro_f1": round(sum(f1) / len(f1), 4),
                    "min": min(f1), "max": max(f1), "seconds": round(sum(r["seconds"] for r in rows) / len(rows), 1),
                    "target": BACKBONE_TARGETS.get(name)}
    return summary


def _mean_over_sets(summary: dict, backbones: list[str]) -> dict:
    """Mean macro-F1 over every set in the table, for the backbones that ran them all (the issue's rule for
    the default: the most accurate backbone whose training stays within 10 minutes a set)."""
    complete = [b for b in backbones if all(b in cells for cells in summary.values())]
    return {b: round(sum(cells[b]["macro_f1"] for cells in summary.values()) / len(summary), 4) for b in complete}


def print_backbones(result: dict) -> None:
    """The comparison table: mean macro-F1 [min-max over split seeds], training seconds, runs per cell."""
    quick = result.get("quick", False)
    names, sets = result["backbones"], result["datasets"]
    width = max(31, *(len(b) + 2 for b in names))
    print("\nmean macro-F1 [min-max over split seeds] / training seconds" + (" (--quick: 2 epochs)" if quick else ""))
    print(f"{'dataset':18}{'target':>7}  " + "".join(f"{b:>{width + 1}}" for b in names))
    for name in sets:
        cells = [result["summary"].get(name, {}).get(b) for b in names]
        line = "".join(f"{c['macro_f1']:.3f} [{c['min']:.3f}-{c['max']:.3f}] {c['seconds']:4.0f}s n={len(c['seeds'])}"
                       .rjust(width + 1) if c else "-".rjust(width + 1) for c in cells)
        print(f"{name:18}{BACKBONE_TARGETS.get(name, 0):7.2f}  " + line)
    means = _mean_over_sets(result["summary"], names)
    if means:
        print(f"{'mean of the sets':18}{'':7}  " + "".join(f"{means[b]:.3f}".rjust(width + 1) if b in means
                                                         else "-".rjust(width + 1) for b in names))
        best = max(means, key=means.get)
        slowest = max(cells[best]["seconds"] for cells in result["summary"].values())
        print(f"most accurate over every set: {best}; its slowest set took {slowest:.0f}s as run "
              "(--threads and other jobs sharing the CPU change that)")


def compare_backbones(backbones: list[str], datasets: list[str], seeds: list[int], quick: bool, threads: int,
                      out: Path, merge: bool) -> dict:
    """Train every backbone on every set and split seed, seed by seed (seed 0 of the whole grid comes first);
    the file is rewritten after each run, so a stopped grid keeps what it measured. With `merge` the file's
    runs for other (set, backbone, seed) triples are kept and those already measured are not run again, so
    parallel processes can share one file and a stopped grid resumes."""
    runs: list[dict] = []

    def save() -> dict:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.with_name(out.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # parallel processes read, merge and write in turn
            kept = []
            if merge and out.is_file():
                done = {(r["dataset"], r["backbone"], r["seed"]) for r in runs}
                kept = [r for r in json.loads(out.read_text())["runs"]
                        if (r["dataset"], r["backbone"], r["seed"]) not in done]
            every = kept + runs
            names, sets = _table_order(every, backbones, datasets)
            result = {"backbones": names, "datasets": sets, "quick": quick, "threads": torch.get_num_threads(),
                      "targets": BACKBONE_TARGETS, "runs": every, "summary": _summarise(every, names, sets)}
            write_json(out, result)
        return result

    measured = {(r["dataset"], r["backbone"], r["seed"]) for r in json.loads(out.read_text())["runs"]} \
        if merge and out.is_file() else set()
    result = save()
    for seed in seeds:
        for name in datasets:
            for backbone in backbones:
                if (name, backbone, seed) in measured:  # --merge: measured by an earlier or a parallel run
                    print(f"{name} {backbone} seed {seed}: measured in {out}, not run again", flush=True)
                    continue
                runs.append(accuracy(name, quick, out.parent / "image_backbone_runs" / backbone, threads, seed, backbone))
                runs[-1]["target"] = BACKBONE_TARGETS.get(name)
                print(json.dumps(runs[-1]), flush=True)
                result = save()
    print_backbones(result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs per set and fewer speed batches.")
    parser.add_argument("--datasets", default=None,
                        help=f"Comma-separated (default {','.join(DATASETS)}; with --backbones also {MULTIMODAL})")
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument("--no-speed", action="store_true", help="Skip the speed table (keep the file's with --merge).")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0 = all CPUs); 1 when other jobs share the CPUs: oversubscribed threads crawl.")
    parser.add_argument("--seeds", default="0", help="Split seeds, comma-separated; one training per set and seed.")
    parser.add_argument("--merge", action="store_true", help="Keep the file's results for what is not run now.")
    parser.add_argument("--backbones", default=None,
                        help="Compare backbones instead: 'offline' (those whose weights an installed package ships) "
                             "or comma-separated names; --datasets then defaults to the four sets and museum_multimodal.")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default bench_results/bench_image.json, with --backbones bench_image_backbones.json)")
    parser.add_argument("--summarize", action="store_true",
                        help="Print the backbone table of --out (default bench_image_backbones.json) from its runs; train nothing.")
    args = parser.parse_args()
    default_out = "bench_image_backbones.json" if args.backbones or args.summarize else "bench_image.json"
    args.out = args.out or ROOT / "bench_results" / default_out
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds}: expected comma-separated integers, e.g. 0,1,2")
    setup_logging()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.summarize:  # the table of --out again, its summary recomputed from its runs
        result = json.loads(args.out.read_text())
        result["backbones"], result["datasets"] = _table_order(result["runs"], result["backbones"], result["datasets"])
        result["summary"] = _summarise(result["runs"], result["backbones"], result["datasets"])
        write_json(args.out, result)
        print_backbones(result)
        return
    if args.backbones:
        names = offline_backbones() if args.backbones == "offline" else [b for b in args.backbones.split(",") if b]
        datasets = [d for d in args.datasets.split(",") if d] if args.datasets else DATASETS + [MULTIMODAL]
        compare_backbones(names, datasets, seeds, args.quick, args.threads, args.out, args.merge)
        print(f"\nwritten to {args.out}")
        return
    size = 160
    result = {"config": config_to_dict(ImageConfig()), "threads": torch.get_num_threads(),
              "load_average_at_start": round(os.getloadavg()[0], 2)}  # other jobs on the machine skew timings
    if not args.no_speed:
        result["speed"] = speed(DATA / "simpsons_small", size, n_batches=3 if args.quick else 6)
        s = result["speed"]
        print(f"\nspeed, images/s (simpsons_small, mobilenet_v2 {size}px, {s['images']} images, {result['threads']} threads)")
        print(f"{'':10} {'(a) ImageFolder':>16} {'(b) shipped':>12} {'(c) model only':>15} {'b/c':>6}")
        for phase in ("train", "inference"):
            a, b, c = s[f"{phase}_a"], s[f"{phase}_b"], s[f"{phase}_c"]
            print(f"{phase:10} {a:16.1f} {b:12.1f} {c:15.1f} {b / c:6.0%}")
    if not args.speed_only:
        out_root = args.out.parent / "image_runs"
        result["accuracy"] = [accuracy(name, args.quick, out_root, args.threads, seed)
                              for name in (args.datasets or ",".join(DATASETS)).split(",") if name for seed in seeds]
    if args.merge and args.out.is_file():  # read as late as possible: a parallel run may have just written it
        old = json.loads(args.out.read_text())
        result.setdefault("speed", old.get("speed"))
        for r in old.get("accuracy", []):
            r.setdefault("seed", 0)  # files written before --seeds trained on seed 0
        done = {(r["dataset"], r["seed"]) for r in result.get("accuracy", [])}
        result["accuracy"] = [r for r in old.get("accuracy", []) if (r["dataset"], r["seed"]) not in done] \
            + result.get("accuracy", [])
        result["accuracy"].sort(key=lambda r: (DATASETS.index(r["dataset"]) if r["dataset"] in DATASETS else len(DATASETS),
                                               r["seed"]))
    if result.get("accuracy"):
        print(f"\n{'dataset':18} {'seed':>4} {'macro-F1':>8} {'target':>7} {'accuracy':>8} {'px':>4} {'epochs':>6} {'seconds':>8}")
        for r in result["accuracy"]:
            print(f"{r['dataset']:18} {r['seed']:4d} {r['macro_f1']:8.4f} {r['target'] or 0:7.2f} {r['accuracy']:8.4f} "
                  f"{r['input_size']:4d} {r['epochs_run']:6d} {r['seconds']:8.1f}")
        result["mean_over_seeds"] = {}
        for name in dict.fromkeys(r["dataset"] for r in result["accuracy"]):
            rows = [r for r in result["accuracy"] if r["dataset"] == name]
            if len(rows) > 1:
                mean = sum(r["macro_f1"] for r in rows) / len(rows)
                result["mean_over_seeds"][name] = {"seeds": [r["seed"] for r in rows], "macro_f1": round(mean, 4)}
                print(f"{name}: mean macro-F1 {mean:.4f} over split seeds {', '.join(str(r['seed']) for r in rows)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
