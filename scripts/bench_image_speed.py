"""Benchmark image scoring paths: images/s and macro-F1 change against torch eager.

For the default backbone (`ImageConfig.backbone`) trained with `museum train-image` on each character set's seeded
80/20 split (trained once into --models with train-image defaults, or --epochs for a short run; reused
after), every path scores the same decoded uint8 validation images through the model's whole scoring
(members, mirror view, softmax):
  eager             the networks in eval mode, as trained
  folded            conv/batch-norm folded copies (`torchutil.inference_copy`)
  channels-last     folded, in channels-last memory format: ImageModel's torch path (CUDA, or no onnxruntime)
  channels-last+bfloat16 / +float16   the same under autocast (bfloat16 on a CPU, float16 on CUDA)
  torchscript       the folded scoring graph traced and frozen (`museum export --format torchscript`)
  onnxruntime       the folded scoring graph in ONNX Runtime (`museum export --format onnx`): ImageModel's
                    default on a CPU with the export extra
  ort-int8-dynamic  ONNX Runtime, Conv/Gemm weights int8, activations quantised per batch
  ort-int8-static   ONNX Runtime, int8 QDQ per channel, activations calibrated on --calibration training images
(the last four on the CPU only). Speed: images/s of each path on --timing-images validation images,
paths interleaved within a round, best of --rounds rounds and of the --batches sizes (on CUDA several:
the batch size is chosen by measurement); the speed-up against eager is taken within each round (the
CPU is shared: rounds differ, ratios within one much less). Accuracy: macro-F1 on the whole validation
split and its change against eager. The recommended default is the fastest path (mean speed-up over the
sets) whose macro-F1 is within 0.005 of eager's on every set.

    python scripts/bench_image_speed.py [--datasets simpsons_small,quintuplets] [--threads 1,2] [--rounds 5]
    python scripts/bench_image_speed.py --device cuda        # torch paths, batch sizes 32..256

Prints a table and writes bench_results/bench_image_speed.json (and .md).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from museum.config import ImageConfig  # noqa: E402
from museum.data.images import decode_cache, list_image_folder  # noqa: E402
from museum.image.export import ExportedImageModel, quantize_onnx, write_torchscript  # noqa: E402
from museum.image.scoring import ScoringGraph, write_onnx  # noqa: E402
from museum.image.model import ImageModel  # noqa: E402
from museum.log import setup_logging  # noqa: E402
from museum.metrics import macro_f1  # noqa: E402
from museum.torchutil import inference_copy  # noqa: E402
from museum.train_image import train_image_model  # noqa: E402
from museum.utils import read_json, resolve_device  # noqa: E402

SHARED = Path(os.environ.get("MUSEUM_SHARED_DATA", ROOT.parent / "shared" / "data"))
DATASETS = ["quintuplets", "simpsons_small", "quintuplets_faces", "simpsons_mnist"]
F1_TOLERANCE = 0.005  # a path may become the default when it loses at most this much macro-F1


def trained_model(name: str, models: Path, seed: int, epochs: int) -> Path:
    """The run folder of `name` (train-image defaults, split seed `seed`), trained now if missing."""
    out = models / name
    if not (out / "best.pt").is_file():
        config = replace(ImageConfig(seed=seed), epochs=epochs) if epochs else ImageConfig(seed=seed)
        train_image_model(config, SHARED / "characters" / name, out)
    return out


def split(model_dir: Path, name: str) -> tuple[list[Path], list[str], list[Path]]:
    """(validation paths, their labels, training paths): the run's own split, from metrics.json."""
    rows = read_json(model_dir / "metrics.json")["val_predictions"]
    val = [Path(r["path"]) for r in rows]
    seen = {p.resolve() for p in val}
    items = list_image_folder(SHARED / "characters" / name)
    return val, [r["true"] for r in rows], [p for p in items.paths if p.resolve() not in seen]


def decode(model: ImageModel, paths: list[Path]) -> torch.Tensor:
    cache, ok, _ = decode_cache(paths, model.input_size, 0, interpolation=model.interpolation)
    assert ok.all(), "a validation image did not decode"
    return cache


def torch_paths(model: ImageModel, device: str) -> dict:
    """name → function(uint8 batch) → probabilities, for the torch paths on `device`."""
    nets = [model.net, *model.members]
    eager = ScoringGraph([copy.deepcopy(n).eval() for n in nets], *model.network_norms(), model.config.tta)
    folded = ScoringGraph([inference_copy(n) for n in nets], *model.network_norms(), model.config.tta)
    eager, folded = eager.to(device).eval(), folded.to(device).eval()
    last = copy.deepcopy(folded).to(memory_format=torch.channels_last)
    # Autocast: float16 on CUDA; bfloat16 on a CPU (fast where it has AVX-512 BF16 or AMX, slow elsewhere).
    low = torch.float16 if device.startswith("cuda") else torch.bfloat16

    def run(graph: ScoringGraph, channels_last: bool = False, autocast: bool = False):
        def score_batch(x: torch.Tensor) -> np.ndarray:
            x = x.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=torch.device(device).type, dtype=low, enabled=autocast):
                return graph(x).float().cpu().numpy()  # .cpu() waits for the device: timings are complete
        return score_batch

    return {"eager": run(eager), "folded": run(folded), "channels-last": run(last, True),
            f"channels-last+{str(low).removeprefix('torch.')}": run(last, True, True)}


def onnx_paths(model: ImageModel, calibration: torch.Tensor, work: Path, threads: int) -> dict:
    """name → function(uint8 batch) → probabilities, for TorchScript and the ONNX Runtime paths (CPU)."""
    folded = ScoringGraph([inference_copy(n) for n in [model.net, *model.members]], *model.network_norms(),
                          model.config.tta).eval()
    write_torchscript(folded, work / "model.ts", model.input_size)
    write_onnx(folded, work / "model.onnx", model.input_size)
    quantize_onnx(work / "model.onnx", work / "dynamic.onnx")
    quantize_onnx(work / "model.onnx", work / "static.onnx", calibration)
    meta = {"classes": model.classes_, "input_size": model.input_size, "interpolation": model.interpolation,
            "decision": None, "runtime": "torchscript"}
    paths = {"torchscript": ExportedImageModel(meta, work / "model.ts").proba_uint8}
    meta["runtime"] = "onnx"
    for name, file in [("onnxruntime", "model.onnx"), ("ort-int8-dynamic", "dynamic.onnx"), ("ort-int8-static", "static.onnx")]:
        paths[name] = ExportedImageModel(meta, work / file, threads=threads).proba_uint8
    return paths


@torch.no_grad()
def score(fn, images: torch.Tensor, batch: int) -> np.ndarray:
    return np.concatenate([fn(images[i:i + batch]) for i in range(0, len(images), batch)])


@torch.no_grad()
def timings(paths: dict, images: torch.Tensor, batches: list[int], rounds: int) -> dict:
    """name → {best images/s and the batch size that gave it, best speed-up against eager within a round}."""
    for fn in paths.values():
        for batch in batches:
            fn(images[:batch])  # warm-up: allocation, onnxruntime's first-run set-up, cuDNN's algorithm search
    rates = {name: [] for name in paths}  # per round: (images/s, batch) at the best batch size of that round
    for r in range(rounds):
        names = list(paths)
        names = names[r % len(names):] + names[:r % len(names)]  # rotate: no path always runs first
        for name in names:
            tried = []
            for batch in batches:
                start = time.perf_counter()
                score(paths[name], images, batch)
                tried.append((len(images) / (time.perf_counter() - start), batch))
            rates[name].append(max(tried))
    out = {}
    for name, got in rates.items():
        best = max(got)
        out[name] = {"images_per_s": round(best[0], 2), "batch": best[1], "all": [round(v, 2) for v, _ in got]}
    return with_speedups(out)


def with_speedups(runs: dict) -> dict:
    """Each path's speed-up against eager: the median over rounds of the ratio within a round (one round
    slowed by a neighbour's burst moves the median little; it would move the best or the mean)."""
    for r in runs.values():
        r["speedup"] = round(float(np.median([a / b for a, b in zip(r["all"], runs["eager"]["all"])])), 3)
    return runs


def bench_set(name: str, args) -> dict:
    model_dir = trained_model(name, args.models, args.seed, args.epochs)
    model = ImageModel.load(model_dir, device="cpu")  # the reference scoring; each path moves its own copy
    val, labels, train = split(model_dir, name)
    images = decode(model, val)
    rng = np.random.default_rng(args.seed)
    calibration = decode(model, sorted(rng.choice(train, min(args.calibration, len(train)), replace=False).tolist()))
    timing = images[np.arange(args.timing_images) % len(images)]
    size = max(args.timing_images, 2 * max(args.batches))
    timing = images[np.arange(size) % len(images)]
    result = {"dataset": name, "model": str(model_dir), "input_size": model.input_size, "tta": model.config.tta,
              "members": 1 + len(model.members), "validation_images": len(val), "calibration_images": len(calibration),
              "device": args.device, "threads": {}}
    if model.head is not None or model.decision is not None:
        raise SystemExit("the benchmark scores fine-tuned many-class models (no head, no decision)")
    model.runtime = "torch"  # the reference: ImageModel's torch scoring (folded, channels-last)
    reference = score(model._proba_uint8, images, args.batches[0])
    with tempfile.TemporaryDirectory() as work:
        for threads in args.threads:
            torch.set_num_threads(threads)
            paths = torch_paths(model, args.device)
            if args.device == "cpu":
                paths |= onnx_paths(model, calibration, Path(work), threads)
            runs = timings(paths, timing, args.batches, args.rounds)
            eager_f1 = None
            for path, fn in paths.items():
                proba = score(fn, images, args.batches[0])
                f1 = macro_f1(labels, [model.classes_[i] for i in proba.argmax(1)], model.classes_)
                eager_f1 = f1 if eager_f1 is None else eager_f1
                runs[path] |= {"macro_f1": round(f1, 4), "f1_change": round(f1 - eager_f1, 4),
                               "max_abs_diff_vs_model": float(np.abs(proba - reference).max()),
                               "argmax_agreement": float((proba.argmax(1) == reference.argmax(1)).mean())}
            result["threads"][str(threads)] = runs
            print_set(name, threads, runs)
    return result


def print_set(name: str, threads: int, runs: dict) -> None:
    print(f"\n{name}, {threads} thread(s)")
    print(f"{'path':24s} {'img/s':>8s} {'batch':>6s} {'x eager':>8s} {'macro-F1':>9s} {'change':>8s} {'max|dp|':>9s}")
    for path, r in runs.items():
        print(f"{path:24s} {r['images_per_s']:8.1f} {r['batch']:6d} {r['speedup']:8.2f} {r['macro_f1']:9.4f} "
              f"{r['f1_change']:+8.4f} {r['max_abs_diff_vs_model']:9.1e}")


def choose(result: dict) -> dict:
    """Per thread count: the fastest path (geometric mean speed-up over sets) within F1_TOLERANCE of eager on every set."""
    chosen = {}
    for threads in result["sets"][0]["threads"]:
        runs = [s["threads"][threads] for s in result["sets"]]
        ok = [p for p in runs[0] if all(r[p]["f1_change"] >= -F1_TOLERANCE for r in runs)]
        speed = {p: float(np.exp(np.mean([np.log(r[p]["speedup"]) for r in runs]))) for p in runs[0]}
        best = max(ok, key=speed.get)
        chosen[threads] = {"path": best, "mean_speedup": round(speed[best], 3), "within_tolerance": ok}
    return chosen


def markdown(result: dict) -> str:
    where = "the CPU" if result.get("device", "cpu") == "cpu" else f"{result['device']} ({result.get('gpu', 'GPU')})"
    lines = [f"# image scoring paths on {where} ({result['cpus']} CPUs, load average {result['load_average']} → "
             f"{result['load_average_end']})", "",
             "| set | threads | path | images/s | batch | × eager | macro-F1 | change |", "|---|---|---|---|---|---|---|---|"]
    for s in result["sets"]:
        for threads, runs in s["threads"].items():
            for path, r in runs.items():
                lines.append(f"| {s['dataset']} | {threads} | {path} | {r['images_per_s']:.1f} | {r['batch']} | {r['speedup']:.2f} | "
                             f"{r['macro_f1']:.4f} | {r['f1_change']:+.4f} |")
    lines += ["", "× eager: median over rounds of the ratio within a round; images/s: the best round.",
              *(f"- {t} thread(s): default path **{c['path']}** ({c['mean_speedup']:.2f}× eager, geometric mean over the sets); within "
                    f"{F1_TOLERANCE} macro-F1 of eager everywhere: {', '.join(c['within_tolerance'])}"
                    for t, c in result["choice"].items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--models", type=Path, default=ROOT / "runs" / "bench_image_speed",
                        help="Where the trained run folders are kept (trained here when missing).")
    parser.add_argument("--seed", type=int, default=0, help="Split and training seed of the runs trained here.")
    parser.add_argument("--epochs", type=int, default=0, help="Epochs of the runs trained here; 0 = train-image's default.")
    parser.add_argument("--threads", default="1", help="Comma-separated torch / onnxruntime thread counts.")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (torch paths only, the batch size chosen by measurement).")
    parser.add_argument("--batches", default=None,
                        help="Comma-separated batch sizes to try per path (default 32 on the CPU, 32,64,128,256 on CUDA).")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--timing-images", type=int, default=128)
    parser.add_argument("--calibration", type=int, default=128, help="Training images that calibrate static int8.")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "bench_image_speed.json")
    parser.add_argument("--summarize", action="store_true", help="Recompute speed-ups, choice and table of --out; measure nothing.")
    args = parser.parse_args()
    if args.summarize:
        result = json.loads(args.out.read_text())
        for s in result["sets"]:
            for runs in s["threads"].values():
                with_speedups(runs)
        return write(result, args.out)
    args.threads = [int(t) for t in args.threads.split(",")]
    args.device = resolve_device(args.device)
    args.batches = [int(b) for b in (args.batches or ("32" if args.device == "cpu" else "32,64,128,256")).split(",")]
    setup_logging()
    torch.manual_seed(args.seed)
    result = {"cpus": os.cpu_count(), "load_average": [round(v, 2) for v in os.getloadavg()], "torch": torch.__version__,
              "device": args.device, "batches": args.batches, "rounds": args.rounds, "timing_images": args.timing_images, "sets": []}
    if args.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    import onnxruntime

    result["onnxruntime"] = onnxruntime.__version__
    for name in [n for n in args.datasets.split(",") if n]:
        result["sets"].append(bench_set(name, args))
    result["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    write(result, args.out)


def write(result: dict, out: Path) -> None:
    result["choice"] = choose(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    print("\n" + markdown(result))
    print(f"written to {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
