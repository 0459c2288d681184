"""`museum submit`: stream a test CSV through the cascade into a `guid,typology` submission.

Memory stays bounded by `chunk_size` rows (plus the set of guids seen, for the duplicate
check). The submission and the optional probabilities file are written through temporary
files and renamed only when the whole run succeeds, so a failing run leaves an earlier
submission intact.
"""

from __future__ import annotations

import csv
import os
import shutil
import time
from collections import Counter
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from museum.config import FusionConfig
import torch.distributed as dist

from museum.data.competition import count_rows, iter_competition_chunks
from museum.engine import DistInfo, all_gather_objects, cleanup_distributed, setup_distributed
from museum.errors import MuseumError
from museum.experts import Experts, availability_counts, load_experts, log_experts, score_chunk
from museum.fusion import ROUTES, FusionRule, describe_rule, load_settings, merge_config, rule_from_settings, settings_path
from museum.log import logger, progress_bar
from museum.folders import check_not_input, model_files
from museum.utils import atomic_path, read_json, resolve_device

DEFAULT_OUT = Path("submissions/submission.csv")


@dataclass
class RunSetup:
    """Everything a run over a CSV needs: the experts, the resolved settings and the image folder."""

    experts: Experts
    config: FusionConfig
    cascade: FusionRule  # the rule that combines the experts: the cascade, or one fitted by `tune --cross-fit`
    images: Path | None
    settings_file: Path | None
    fallback_source: str


def resolve_images(csv_path: Path | None, images: Path | None) -> Path | None:
    """The image folder: as given, else `images/` beside the CSV (the competition layout), else none.

    No CSV (`museum.predictor`, which is given rows, not a file): only a folder given counts."""
    if images is not None:
        if not images.is_dir():
            raise MuseumError(f"--images {images}: not a folder; give the folder holding {{guid}}.jpg files")
        return images
    beside = csv_path.parent / "images" if csv_path is not None else None
    return beside if beside is not None and beside.is_dir() else None


def training_class_counts(experts: Experts) -> tuple[Counter, str]:
    """Class counts that stand in for the training distribution, and where they came from.

    Both trainers write `metrics.json` with a per-class validation report; their validation
    split is stratified, so its supports are proportional to the training counts. The text
    expert comes first: it is trained on the competition's own class distribution.
    """
    for kind, folder in (("text", experts.text_dir), ("image", experts.image_dir)):
        path = folder / "metrics.json" if folder is not None else None
        if path is None or not path.exists():
            continue
        try:
            data = read_json(path)
            # train-text writes the report at the top level, train-image under "validation".
            per_class = data.get("per_class") or (data.get("validation") or {}).get("per_class") or {}
            counts = Counter({str(c): int(m["support"]) for c, m in per_class.items()})
        except (AttributeError, KeyError, TypeError, ValueError, MuseumError):
            logger.warning(f"{path}: no per-class supports in it; cannot derive the fallback class from it")
            continue
        if counts:
            return counts, f"{kind} model's stratified validation split ({path})"
    return Counter(), ""


def resolve_fallback(config: FusionConfig, experts: Experts) -> tuple[str, str]:
    """(fallback class, where it came from): explicit/saved setting, else the most frequent training class."""
    if config.fallback:
        return config.fallback, "settings"
    counts, source = training_class_counts(experts)
    if counts:
        # Most frequent; ties go to the first name in sorted order, so the choice is reproducible.
        best = max(sorted(counts), key=lambda c: counts[c])
        return best, f"most frequent class in the {source}"
    raise MuseumError(
        "no fallback class: the models do not record their training class counts; pass --fallback CLASS"
    )


def prepare(
    csv_path: Path | None,
    images: Path | None,
    text_model: Path | None,
    image_model: Path | None,
    overrides: dict,
    settings_file: Path | None = None,
    use_saved: bool = True,
) -> RunSetup:
    """Load the experts, the saved `fusion.json` (if any, and if `use_saved`) and apply explicit overrides."""
    # Settings asked for by name must exist; only the default place may be empty (then: defaults).
    if settings_file is not None and not Path(settings_file).is_file():
        raise MuseumError(f"--settings {settings_file}: no such file; write it with `museum tune --out`, or drop the option")
    images = resolve_images(csv_path, images)
    experts = load_experts(text_model, image_model, device=overrides.get("device") or "auto")
    log_experts(experts)
    settings_file = settings_file or settings_path(text_model, image_model)
    base, saved = FusionConfig(), None
    if use_saved and settings_file.exists():
        base, saved = load_settings(settings_file)
        logger.info(f"settings: {settings_file} (from museum tune)")
        _warn_if_other_models(saved, experts)
    else:
        settings_file = None
    config = merge_config(base, overrides)
    fallback, source = resolve_fallback(config, experts)
    config = merge_config(config, {"fallback": fallback})
    # The rule fusion.json names (a learned one from `tune --cross-fit`), else the cascade of `config`;
    # threshold options given explicitly mean the user wants the cascade with them.
    explicit = any(overrides.get(k) is not None for k in ("text_threshold", "image_threshold", "blend_weight"))
    rule = rule_from_settings(None if explicit else saved, experts.classes, config)
    logger.info(f"fusion: {rule.kind}, {describe_rule(rule)}, fallback {fallback!r} ({source})")
    logger.info(f"images: {images if images is not None else 'none'}")
    return RunSetup(experts, config, rule, images, settings_file, source)


def _warn_if_other_models(saved: dict, experts: Experts) -> None:
    for kind, folder in (("text", experts.text_dir), ("image", experts.image_dir)):
        was = saved.get(f"{kind}_model")
        now = str(folder.resolve()) if folder is not None else None
        if was != now:
            logger.warning(f"settings were tuned with {kind} model {was}, this run uses {now}; re-run museum tune")


@dataclass
class SubmitSummary:
    """Counts and timing of one `submit` run, printed as the closing table."""

    out: Path
    proba_out: Path | None
    rows: int = 0
    routes: Counter = field(default_factory=Counter)
    availability: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    fallback: str = ""
    rule: str = "cascade"  # the fusion rule's kind: rows with both modalities are routed `blend` by the cascade, else by this rule

    def format(self) -> str:
        lines = [f"{'rows':<24}{self.rows:>8}", f"{'fusion rule':<24}{self.rule:>8}"]
        for route in route_names(self.rule):
            note = f"  ({self.fallback})" if route == "fallback" and self.routes[route] else ""
            lines.append(f"{'route ' + route:<24}{self.routes[route]:>8}{note}")
        for key in sorted(self.availability):
            lines.append(f"{key:<24}{self.availability[key]:>8}")
        lines.append(f"{'seconds':<24}{self.seconds:>8.1f}")
        lines.append(f"{'submission':<24}{self.out}")
        if self.proba_out is not None:
            lines.append(f"{'probabilities':<24}{self.proba_out}")
        return "\n".join(lines)


def route_names(rule: str) -> tuple[str, ...]:
    """Names of the route codes: a learned rule decides the rows with both modalities under its own name."""
    return ROUTES if rule == "cascade" else tuple(rule if name == "blend" else name for name in ROUTES)


def submit(
    test_csv: Path,
    out: Path = DEFAULT_OUT,
    images: Path | None = None,
    text_model: Path | None = None,
    image_model: Path | None = None,
    proba_out: Path | None = None,
    overrides: dict | None = None,
    settings_file: Path | None = None,
    setup: RunSetup | None = None,
    progress: Callable[[int], None] | None = None,
) -> SubmitSummary:
    """Write `guid,typology` for every row of `test_csv`, in its order, through the cascade.

    `setup` reuses experts that are already loaded (the web server's); `progress` is called
    with the number of rows written so far after each chunk.
    """
    start = time.perf_counter()
    test_csv, out = Path(test_csv), Path(out)
    if proba_out is not None and Path(proba_out).resolve() == out.resolve():
        raise MuseumError(f"--proba {proba_out}: same file as --out; give another path")
    inputs = [test_csv, settings_file, *model_files(text_model), *model_files(image_model)]
    check_not_input(out, inputs, "--out")
    check_not_input(proba_out, inputs, "--proba")
    info, _ = setup_distributed(resolve_device((overrides or {}).get("device") or "auto")) if setup is None else (DistInfo(), "")
    try:
        if not info.enabled:
            setup = setup or prepare(test_csv, images, text_model, image_model, overrides or {}, settings_file)
            summary = SubmitSummary(out=out, proba_out=proba_out, fallback=setup.cascade.fallback, rule=setup.cascade.kind)
            with ExitStack() as stack:
                writers = _open_writers(stack, setup, atomic_path(out),
                                        atomic_path(proba_out) if proba_out is not None else None, header=True)
                _score_rows(setup, test_csv, 0, None, writers, summary, progress, show=True)
        else:
            summary = _submit_shard(info, test_csv, out, images, text_model, image_model, proba_out, overrides or {},
                                    settings_file, progress)
    finally:
        cleanup_distributed()
    summary.seconds = time.perf_counter() - start
    return summary


def shard_bounds(n_rows: int, world: int, rank: int) -> tuple[int, int]:
    """Rows [lo, hi) of rank `rank` of `world`: contiguous, in order, sizes differing by at most one (some may be empty)."""
    return n_rows * rank // world, n_rows * (rank + 1) // world


def _open_writers(stack: ExitStack, setup: RunSetup, out_ctx, proba_ctx, header: bool):
    """csv writers for the submission (and the probabilities), opened on the paths the contexts yield."""
    # csv's default dialect ends lines with \r\n and quotes only when needed: byte for
    # byte the format of the competition's sample_submission.csv.
    writer = csv.writer(stack.enter_context(open(stack.enter_context(out_ctx), "w", encoding="utf-8", newline="")))
    if header:
        writer.writerow(["guid", "typology"])
    proba_writer = None
    if proba_ctx is not None:
        proba_writer = csv.writer(stack.enter_context(open(stack.enter_context(proba_ctx), "w", encoding="utf-8", newline="")))
        if header:
            proba_writer.writerow(["guid", "route", "typology", *setup.cascade.classes])
    return writer, proba_writer


def _score_rows(setup: RunSetup, test_csv: Path, lo: int, hi: int | None, writers, summary: SubmitSummary,
                progress: Callable[[int], None] | None, show: bool) -> None:
    """Score rows [lo, hi) of `test_csv` (every row is still read and checked) and write them in order."""
    config, cascade = setup.config, setup.cascade
    writer, proba_writer = writers
    end = 0
    with progress_bar(unit=" rows", desc="submit", show=show) as bar:
        for chunk in iter_competition_chunks(test_csv, chunk_size=config.chunk_size):
            begin, end = end, end + len(chunk)  # the chunk's rows in the file
            keep_lo, keep_hi = max(lo, begin), end if hi is None else min(hi, end)
            if keep_hi <= keep_lo:
                if hi is not None and begin >= hi:
                    break  # past this shard: later rows are other ranks' (the earlier ones were still checked)
                continue
            if (keep_lo, keep_hi) != (begin, end):
                chunk = chunk.subset(list(range(keep_lo - begin, keep_hi - begin)))
            scores = score_chunk(setup.experts, chunk, setup.images, config.batch_size, config.workers)
            result = cascade.combine(scores.text_p, scores.image_p, scores.has_text, scores.has_image)
            labels = result.labels(cascade.classes)
            names = route_names(cascade.kind)
            writer.writerows(zip(chunk.guids, labels))
            if proba_writer is not None:
                for guid, route, label, row in zip(chunk.guids, result.routes, labels, result.proba):
                    proba_writer.writerow([guid, names[route], label, *(f"{p:.6f}" for p in row)])
            summary.rows += len(chunk)
            summary.routes.update(names[r] for r in result.routes)
            summary.availability.update(availability_counts(scores))
            bar.update(len(chunk))
            if progress is not None:
                progress(summary.rows)


def _part(path: Path, rank: int) -> Path:
    # `.NAME.PID.rankR.tmp`: the pattern atomic_path cleans up once PID is gone
    return path.parent / f".{path.name}.{os.getpid()}.rank{rank}.tmp"


def _submit_shard(info: DistInfo, test_csv: Path, out: Path, images, text_model, image_model, proba_out, overrides: dict,
                  settings_file, progress) -> SubmitSummary:
    """One torchrun rank: score a contiguous shard into part files; rank 0 joins them, in order, atomically.

    Any rank's failure fails every rank with the same one-line error, and nothing is written."""
    parts: list[Path] = []
    summary = SubmitSummary(out=out, proba_out=proba_out)
    failure = None
    try:
        setup = prepare(test_csv, images, text_model, image_model, overrides, settings_file)
        summary.fallback, summary.rule = setup.cascade.fallback, setup.cascade.kind
        lo, hi = shard_bounds(count_rows(test_csv), info.world, info.rank)
        parts = [_part(out, info.rank)] + ([_part(proba_out, info.rank)] if proba_out is not None else [])
        with ExitStack() as stack:
            writers = _open_writers(stack, setup, nullcontext(parts[0]),
                                    nullcontext(parts[1]) if proba_out is not None else None, header=False)
            _score_rows(setup, test_csv, lo, hi, writers, summary, progress, show=info.is_main)
    except MuseumError as exc:
        failure = str(exc)
    except Exception as exc:  # noqa: BLE001 - reported by every rank below, in one line
        failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    everyone = all_gather_objects((failure, [str(p) for p in parts], summary.rows, summary.routes, summary.availability), info)
    try:
        failed = [(rank, why) for rank, (why, *_rest) in enumerate(everyone) if why is not None]
        if failed:
            rank, why = failed[0]
            raise MuseumError(why if all(w == why for _, w in failed) else f"rank {rank} of {info.world}: {why}")
        if info.is_main:
            _join([Path(e[1][0]) for e in everyone], out, ["guid", "typology"])
            if proba_out is not None:
                _join([Path(e[1][1]) for e in everyone], proba_out, ["guid", "route", "typology", *setup.cascade.classes])
            summary.rows = sum(e[2] for e in everyone)
            summary.routes = sum((e[3] for e in everyone), Counter())
            summary.availability = sum((e[4] for e in everyone), Counter())
    finally:
        dist.barrier()  # rank 0 has read every part (or the run failed): each rank removes its own
        for part in parts:
            part.unlink(missing_ok=True)
    return summary


def _join(parts: list[Path], path: Path, header: list[str]) -> None:
    """`header` and the parts' rows, in rank order, written atomically to `path`."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            csv.writer(f).writerow(header)
            for part in parts:
                with open(part, encoding="utf-8", newline="") as src:
                    shutil.copyfileobj(src, f)


def check_submission(path: Path, sample: Path, classes: list[str] | None = None) -> list[str]:
    """Problems of a submission against the sample: header, guids and their order, class names."""
    def rows(p: Path) -> list[list[str]]:
        with open(p, encoding="utf-8-sig", newline="") as f:
            return list(csv.reader(f))

    ours, theirs = rows(path), rows(sample)
    problems = []
    if not ours or ours[0] != theirs[0]:
        problems.append(f"header {ours[0] if ours else None} != {theirs[0]}")
    if [r[0] for r in ours[1:]] != [r[0] for r in theirs[1:]]:
        problems.append("guids differ from the sample's (or their order does)")
    if any(len(r) != 2 for r in ours):
        problems.append("some rows do not have exactly two fields")
    if classes is not None:
        unknown = sorted({r[1] for r in ours[1:] if len(r) == 2} - set(classes))
        if unknown:
            problems.append(f"unknown class names: {unknown}")
    return problems

