"""Which files a model was trained on: `data.json` in every model folder.

`museum tune --cross-fit` retrains each expert on its own training data minus the rows it is
asked to score, so it must know that data exactly: absolute paths, sizes and sha256 of the
CSV files, and the images folder. `check_training_record` refuses (one line, naming the file)
when the record is missing or a recorded file has gone or changed since training, because a
retrain on different data would no longer stand for the saved model.
"""

from __future__ import annotations

import os
from pathlib import Path

from museum.errors import MuseumError
from museum.log import logger
from museum.utils import read_json, sha256_file, write_json

DATA_NAME = "data.json"
RECORD_FORMAT = "museum-data/1"


def file_record(path: str | Path) -> dict:
    """{"path": absolute path, "size": bytes, "sha256": hex} of one file."""
    path = Path(path).resolve()
    try:
        return {"path": str(path), "size": path.stat().st_size, "sha256": sha256_file(path)}
    except OSError as exc:
        raise MuseumError(f"{path}: cannot read it to record the training data ({exc.strerror})") from None


def folder_record(folder: str | Path) -> dict:
    """{"path": absolute path, "files": count, "bytes": total} of a folder, subfolders included.

    Sizes, not hashes: an image folder may hold tens of thousands of files, and the counts are
    enough to notice one that was swapped for another set.
    """
    folder = Path(folder).resolve()
    files = total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                continue
            files += 1
    return {"path": str(folder), "files": files, "bytes": total}


def training_record(train_csv: str | Path | None, images: str | Path | None = None,
                    unlabeled=(), val: str | Path | None = None) -> dict:
    """What a trainer saw: its labelled CSV (None for a folder-per-class image set), the images
    folder, unlabelled CSVs (Word2Vec's extra text) and a validation CSV or folder."""
    return {
        "format": RECORD_FORMAT,
        "train": None if train_csv is None else file_record(train_csv),
        "images": None if images is None else folder_record(images),
        "unlabeled": [file_record(p) for p in unlabeled],
        "val": None if val is None else (folder_record(val) if Path(val).is_dir() else file_record(val)),
    }


def save_training_record(model_dir: str | Path, record: dict) -> Path:
    """Write `record` as `model_dir/data.json` (atomically); returns its path."""
    path = Path(model_dir) / DATA_NAME
    write_json(path, record)
    return path


def check_training_record(model_dir: str | Path) -> dict:
    """The model folder's `data.json`, after checking every recorded file is still there, unchanged.

    One-line `MuseumError` when the record is missing (a folder trained before records were kept:
    retrain), malformed, or a recorded file or folder has gone or its sha256 changed.
    """
    model_dir = Path(model_dir)
    path = model_dir / DATA_NAME
    if not path.is_file():
        raise MuseumError(f"{model_dir}: no {DATA_NAME}, so the data it was trained on is unknown (a model folder from "
                          "before training records were kept); retrain it with museum train-text / train-image")
    record = read_json(path)
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise MuseumError(f"{path}: not a museum training record; retrain the model in {model_dir}")
    files = [record.get("train"), *(record.get("unlabeled") or [])]
    val = record.get("val")
    if val is not None and "sha256" in val:
        files.append(val)
    for entry in files:
        if entry is not None:
            _check_file(entry, model_dir)
    for entry in (record.get("images"), val if val is not None and "sha256" not in val else None):
        if entry is not None:
            _check_folder(entry, model_dir)
    return record


def _check_file(entry: dict, model_dir: Path) -> None:
    file = Path(entry["path"])
    if not file.is_file():
        raise MuseumError(f"{file}: recorded in {model_dir / DATA_NAME} as training data but gone; put it back "
                          f"or retrain the model in {model_dir} on the data you have")
    if file.stat().st_size != entry["size"] or sha256_file(file) != entry["sha256"]:
        raise MuseumError(f"{file}: changed since the model in {model_dir} was trained on it (sha256 differs); "
                          f"restore that version or retrain the model")


def _check_folder(entry: dict, model_dir: Path) -> None:
    folder = Path(entry["path"])
    if not folder.is_dir():
        raise MuseumError(f"{folder}: images folder recorded in {model_dir / DATA_NAME} but gone; put it back "
                          f"or retrain the model in {model_dir} on the data you have")
    now = folder_record(folder)
    if (now["files"], now["bytes"]) != (entry["files"], entry["bytes"]):
        # Images added or replaced: retraining still works, but on different photos than the model saw.
        logger.warning(f"{folder}: {now['files']} files / {now['bytes']} bytes now, {entry['files']} / "
                       f"{entry['bytes']} when the model in {model_dir} was trained")
