"""`museum train-image`: list the images, train (`museum.image.train.fit_image_model`), write the run folder.

The run works in `OUT.partial` (checkpoints as it goes; `--resume` continues there) and, once
complete, replaces `--out` as a whole (`museum.folders`), with config.json, data.json (what it
was trained on), metrics.json and report.html beside the model. A workflow: the image expert
itself knows nothing of run folders or reports.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

from museum.config import ImageConfig, config_to_dict
from museum.data.images import ImageItems, list_competition_images, list_image_folder
from museum.engine import cleanup_distributed, load_checkpoint
from museum.errors import MuseumError
from museum.folders import check_destination, check_not_input, partial_folder, publish
from museum.image.binary import finish_binary, one_vs_rest, resolve_positive
from museum.image.model import ImageModel
from museum.image.train import fit_image_model
from museum.log import logger
from museum.metrics import format_report
from museum.provenance import save_training_record, training_record
from museum.reports import write_report_safely
from museum.utils import read_json, write_json


def load_items(images: Path, train_csv: Path | None) -> ImageItems:
    """The labelled images of a folder-per-class set, or of train.csv + images/{guid}.jpg."""
    if train_csv is not None:
        items = list_competition_images(train_csv, images)
        if items.skipped:
            logger.warning(f"{train_csv}: skipped {sum(items.skipped.values())} row(s): "
                           + ", ".join(f"{n} {r}" for r, n in sorted(items.skipped.items())))
        return items
    return list_image_folder(images)


# Where and how fast a run computes, not what it learns: a killed run may resume with others.
RUNTIME_OPTIONS = frozenset({"device", "workers", "threads", "cache_dir"})


def train_image_model(config: ImageConfig, images: Path, out: Path, train_csv: Path | None = None,
                      val: Path | None = None, resume: bool = False) -> ImageModel:
    """`museum train-image`: list the data, fit, and write the run folder (rank 0 only).

    The run works in `OUT.partial` (checkpoints as it goes; `--resume` continues there) and, once
    complete, replaces `out` as a whole: a run killed at any moment leaves the previous model intact."""
    check_not_input(out, [images, train_csv, val, config.embeddings], folder=True)
    out = check_destination(out)
    work = partial_folder(out)
    is_main = os.environ.get("RANK", "0") == "0"
    items = load_items(images, train_csv)
    val_items = list_image_folder(val, "--val") if val is not None else None
    positive = resolve_positive(items.labels, config.positive)  # None: a many-class task
    if positive is None and config.target_precision is not None:
        raise MuseumError(f"--target-precision: only for yes/no tasks; {len(set(items.labels))} classes here, "
                          "so pass --positive CLASS too, or drop it")
    if positive is not None:
        items, val_items = one_vs_rest(items, positive), one_vs_rest(val_items, positive)
    wanted = config_to_dict(config)
    record = training_record(train_csv, images, val=val)
    if resume:
        check_resume(work, out, wanted, record, sorted(set(items.labels)))
    elif is_main:
        if (work / "last.pt").is_file():
            raise MuseumError(f"--out {out}: an interrupted run waits in {work}; continue it with --resume, "
                              "or delete that folder to start over")
        shutil.rmtree(work, ignore_errors=True)  # a run that died before its first checkpoint: nothing to keep
        write_json(work / "config.json", wanted)
        save_training_record(work, record)
    try:
        model = fit_image_model(config, items.paths, items.labels, val_items.paths if val_items else None,
                                val_items.labels if val_items else None, out=work, resume=resume)
        if is_main:
            if positive is not None:
                finish_binary(model, positive, config.target_precision)
                model.write_files(work)  # the checkpoint now carries the decision threshold
            model.report_["train_class_counts"] = dict(Counter(items.labels))
            # A head run resolves only these; fine-tuning has already written all its auto options.
            model.report_.setdefault("resolved", {"input_size": model.input_size, "device": str(model.device)})
            write_json(work / "metrics.json", model.report_)
            val_metrics = model.report_.get("validation")
            if val_metrics:
                what = (f"{config.head} head" if config.head != "finetune" else f"best epoch {model.epoch}" if not model.members
                        else f"{1 + len(model.members)} networks averaged")
                logger.info(format_report(val_metrics, f"validation ({what})"))
            report = write_report_safely(work, shown_as=out)
            publish(work, out, "image")
            logger.info(f"model written to {out}")
            if report is not None:
                logger.info(f"report: {out / report.name}")
    except BaseException:
        if is_main and not (work / "last.pt").is_file():  # failed before any checkpoint: no run to resume
            shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        cleanup_distributed()
    return model


def check_resume(work: Path, out: Path, wanted: dict, record: dict, classes: list[str]) -> None:
    """A one-line error unless `work` holds an interrupted run of these options, data and classes."""
    if not (work / "config.json").is_file() or not (work / "last.pt").is_file():
        raise MuseumError(f"--resume: {work} holds no interrupted run of --out {out} (config.json and last.pt); "
                          "check --out, or drop --resume to start one")
    saved = read_json(work / "config.json")
    changed = sorted(k for k in set(saved) | set(wanted) if k not in RUNTIME_OPTIONS and saved.get(k) != wanted.get(k))
    if changed:
        raise MuseumError(f"--resume: options differ from {work / 'config.json'} ("
                          + ", ".join(f"{k}: {saved.get(k)!r} then, {wanted.get(k)!r} now" for k in changed[:3])
                          + "); pass the same options or drop --resume")
    then = read_json(work / "data.json") if (work / "data.json").is_file() else None
    if then is not None:
        for key, what in (("train", "training CSV"), ("images", "images folder"), ("val", "validation data")):
            before, now = then.get(key), record.get(key)
            differs = (before is None) != (now is None) or (before is not None and any(
                before.get(k) != now.get(k) for k in ("path", "sha256", "files", "bytes") if k in before or k in now))
            if differs:
                raise MuseumError(f"--resume: the {what} is not the one the interrupted run trained on "
                                  f"({_describe(before)} then, {_describe(now)} now); pass the same data or drop --resume")
    saved_classes = list(load_checkpoint(work / "last.pt").get("classes") or [])
    if saved_classes and saved_classes != classes:
        gone, new = sorted(set(saved_classes) - set(classes)), sorted(set(classes) - set(saved_classes))
        raise MuseumError(f"--resume: the classes differ from the interrupted run's (only then: {', '.join(gone[:5]) or '-'}; "
                          f"only now: {', '.join(new[:5]) or '-'}); pass the same data or drop --resume")


def _describe(entry: dict | None) -> str:
    if entry is None:
        return "none"
    detail = f"{entry['files']} files" if "files" in entry else f"sha256 {str(entry.get('sha256'))[:12]}"
    return f"{entry.get('path')}, {detail}"
