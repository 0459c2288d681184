"""`museum clean`: likely label errors, found by confident learning on out-of-fold probabilities.

1. Every row gets class probabilities from an expert that never saw it: k stratified, seeded
   folds. Text rows use the TF-IDF expert (`fast`, seconds a fold) or the full TextModel
   (`full`, Word2Vec + BiLSTM + TF-IDF, about 30 s a fold); images use a logistic head on
   pretrained-backbone embeddings (`museum.image.embed`), because fine-tuning a CNN k times
   would take hours on a CPU while the embeddings are computed once and cached. Rows with
   both modalities average the two. The probabilities are saved (`oof.npz` + `oof.json`) so
   that `--reuse` reruns the audit without training anything.
2. cleanlab's `find_label_issues` flags rows whose given label the out-of-fold model
   disbelieves beyond each class's estimated noise rate; `get_label_quality_scores`
   (self-confidence: the probability of the given label) ranks them.
3. Outputs: `label_issues.csv`, `confused_pairs.csv`, `label_issues.html` (top items with
   thumbnail and/or description) and, with `drop` or `relabel`, a cleaned copy. The input is
   only ever read.
"""

from __future__ import annotations

import csv
import hashlib
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from museum.data.competition import LABEL_COLUMN, guid_image_paths, read_competition_csv, stratified_folds
from museum.errors import MuseumError, load_failure
from museum.extras import require
from museum.log import logger
from museum.utils import atomic_path, check_classes, output_folder, read_json, write_csv, write_csv_copy, write_json

EXPERTS = ("fast", "full")
ACTIONS = ("report", "drop", "relabel")
OOF_FORMAT = "museum-oof/1"
TOP_ITEMS = 100  # rows shown on the page; the CSV lists every flagged row


@dataclass
class AuditItems:
    """What is audited: one id and label per row, with its description and/or image."""

    source: Path
    ids: list[str]
    labels: list[str]
    texts: list[str] | None = None  # descriptions (CSV input)
    paths: list[Path | None] | None = None  # image per row, None where it is missing
    lines: list[int] = field(default_factory=list)  # CSV line of each row, for messages


@dataclass
class OutOfFold:
    """Out-of-fold probabilities (columns follow `classes`); `scored` is False where no expert could see the row."""

    proba: np.ndarray
    scored: np.ndarray
    classes: list[str]
    experts: list[str]
    meta: dict


@dataclass
class CleanResult:
    out_dir: Path
    issues: list[dict]
    pairs: list[dict]
    page: Path
    cleaned: Path | None
    text: str


# ----------------------------------------------------------------------------- input


def load_items(train_csv: str | Path | None, images: str | Path | None) -> AuditItems:
    """A competition CSV (with `images/{guid}.jpg` when `images` is given), or a folder-per-class set."""
    from museum.data.images import list_image_folder

    if train_csv is None:
        if images is None:
            raise MuseumError("nothing to audit: give a train CSV, --images FOLDER (one sub-folder per class), or both")
        root = Path(images)
        found = list_image_folder(root)
        return AuditItems(root, [p.relative_to(root).as_posix() for p in found.paths], found.labels, paths=list(found.paths))
    table = read_competition_csv(train_csv, require_labels=True)
    items = AuditItems(Path(train_csv), table.guids, list(table.labels or []), texts=table.descriptions, lines=table.lines)
    if images is not None:
        items.paths = guid_image_paths(train_csv, table.guids, images)
    return items


def _items_digest(items: AuditItems) -> str:
    """Fingerprint of ids and labels: `--reuse` must refuse probabilities computed for other rows."""
    h = hashlib.sha256()
    for i, label in zip(items.ids, items.labels):
        h.update(f"{i}\t{label}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- out-of-fold probabilities


def _seed(seed: int) -> None:
    # LinearSVC draws from NumPy's global generator when it is given no random_state.
    random.seed(seed)
    np.random.seed(seed)


def _text_oof(texts: list[str], y: np.ndarray, classes: list[str], splits, seed: int, expert: str) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, mask): rows with an empty description are neither trained on nor scored."""
    from museum.text.tfidf import TfidfExpert

    has_text = np.array([bool(t.strip()) for t in texts])
    proba = np.zeros((len(texts), len(classes)), dtype=np.float32)
    for k, (train_idx, test_idx) in enumerate(splits):
        train_idx, test_idx = train_idx[has_text[train_idx]], test_idx[has_text[test_idx]]
        _seed(seed + k)
        tr_texts, tr_labels = [texts[i] for i in train_idx], [classes[j] for j in y[train_idx]]
        if expert == "full":
            from museum.config import TextConfig
            from museum.text.model import TextModel

            # TextModel stops early on a validation set: it carves a stratified 15 % out of this fold's training part.
            model = TextModel(TextConfig(seed=seed + k, val_fraction=0.15)).fit(tr_texts, tr_labels, progress=False)
        else:
            model = TfidfExpert(seed=seed + k).fit(tr_texts, tr_labels)
        cols = [classes.index(c) for c in model.classes_]  # a class may be absent from a fold's text rows
        proba[np.ix_(test_idx, cols)] = model.predict_proba([texts[i] for i in test_idx])
        logger.info(f"text fold {k + 1}/{len(splits)}: {len(train_idx)} rows trained, {len(test_idx)} scored")
    return proba, has_text


def _image_oof(paths: list[Path | None], y: np.ndarray, classes: list[str], splits, seed: int,
               cache_file: Path | None, embeddings: Path | None = None,
               source: Path | str = "the audit") -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, mask) from `train-image --head logreg` on cached stage embeddings; unreadable images are unscored."""
    from museum.image.embed import image_embeddings
    from museum.image.heads import fit_head

    feats, ok = image_embeddings(paths, cache_file, features="stages", given=embeddings, any_backbone=True)
    # Folds are cut over every row: the readable images alone must still hold two classes to learn from.
    check_classes([classes[j] for j in y[ok]], f"{source}: the readable images", "an image audit")
    proba = np.zeros((len(paths), len(classes)), dtype=np.float32)
    for k, (train_idx, test_idx) in enumerate(splits):
        train_idx, test_idx = train_idx[ok[train_idx]], test_idx[ok[test_idx]]
        head, _ = fit_head("logreg", feats[train_idx], y[train_idx], len(classes), seed + k)
        proba[test_idx] = head.predict_proba(feats[test_idx])
        logger.info(f"image fold {k + 1}/{len(splits)}: {len(train_idx)} images trained, {len(test_idx)} scored")
    return proba, ok


def out_of_fold(items: AuditItems, folds: int = 5, seed: int = 0, expert: str = "fast",
                cache_file: Path | None = None, embeddings: Path | None = None) -> OutOfFold:
    """k-fold stratified, seeded out-of-fold probabilities from every expert the items allow."""
    if expert not in EXPERTS:
        raise MuseumError(f"--expert {expert}: expected one of {', '.join(EXPERTS)}")
    classes = check_classes(items.labels, f"{items.source}: the labels", "an audit")
    y = np.searchsorted(classes, items.labels)
    splits = stratified_folds(items.labels, folds, seed)
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if items.texts is not None and any(t.strip() for t in items.texts):
        parts["text"] = _text_oof(items.texts, y, classes, splits, seed, expert)
    if items.paths is not None:
        parts["image"] = _image_oof(items.paths, y, classes, splits, seed, cache_file, embeddings, items.source)
    if not parts:
        raise MuseumError(f"{items.source}: every description is empty and no --images were given; nothing to learn from")
    # Average the experts that saw each row: a row with text only keeps the text probabilities.
    total = sum(p * m[:, None] for p, m in parts.values())
    count = sum(m.astype(np.float32) for _, m in parts.values())
    scored = count > 0
    proba = np.where(scored[:, None], total / np.maximum(count, 1)[:, None], 0).astype(np.float32)
    meta = {"format": OOF_FORMAT, "source": str(items.source), "rows": len(items.ids), "items_sha256": _items_digest(items),
            "classes": classes, "folds": folds, "seed": seed, "expert": expert, "experts": list(parts),
            "scored_rows": int(scored.sum())}
    return OutOfFold(proba, scored, classes, list(parts), meta)


def save_oof(oof: OutOfFold, out_dir: Path) -> None:
    with atomic_path(out_dir / "oof.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, proba=oof.proba, scored=oof.scored)
    write_json(out_dir / "oof.json", oof.meta)


def load_oof(out_dir: Path, items: AuditItems) -> OutOfFold:
    """Saved probabilities, checked to belong to exactly these rows and labels."""
    meta_path, arrays_path = out_dir / "oof.json", out_dir / "oof.npz"
    if not meta_path.is_file() or not arrays_path.is_file():
        raise MuseumError(f"--reuse: {out_dir} holds no oof.json/oof.npz; run once without --reuse")
    meta = read_json(meta_path)
    if meta.get("format") != OOF_FORMAT:
        raise MuseumError(f"{meta_path}: unknown format {meta.get('format')!r}; run once without --reuse")
    if meta.get("items_sha256") != _items_digest(items):
        raise MuseumError(f"--reuse: {meta_path} was computed for other rows or labels than {items.source}; "
                          "run without --reuse")
    try:
        with np.load(arrays_path, allow_pickle=False) as arrays:
            proba, scored = arrays["proba"], arrays["scored"].astype(bool)
    except (OSError, KeyError, ValueError) as exc:
        raise MuseumError(f"{arrays_path}: unreadable ({load_failure(exc)}); run without --reuse") from None
    if proba.shape != (len(items.ids), len(meta["classes"])):
        raise MuseumError(f"{arrays_path}: shape {proba.shape} does not match {meta_path}; run without --reuse")
    return OutOfFold(proba, scored, list(meta["classes"]), list(meta["experts"]), meta)


# ----------------------------------------------------------------------------- audit


def find_issues(labels: list[str], oof: OutOfFold) -> tuple[list[dict], np.ndarray]:
    """(flagged rows, most uncertain first, as dicts; quality score of every row, NaN where unscored)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    rows = np.flatnonzero(oof.scored)
    y = np.searchsorted(oof.classes, [labels[i] for i in rows])
    proba = oof.proba[rows]
    # n_jobs=1: the CPU is shared, and cleanlab's process pool would cost more than it saves here.
    flagged = find_label_issues(y, proba, filter_by="prune_by_noise_rate", n_jobs=1)
    quality = np.full(len(labels), np.nan)
    quality[rows] = get_label_quality_scores(y, proba, method="self_confidence")
    issues = []
    for r, yi, p in zip(rows[flagged], y[flagged], proba[flagged]):
        order = np.argsort(-p, kind="stable")
        best = int(order[0]) if order[0] != yi else int(order[1])
        issues.append({"index": int(r), "given": oof.classes[yi], "suggested": oof.classes[best],
                       "score": float(quality[r]), "p_given": float(p[yi]), "p_suggested": float(p[best])})
    issues.sort(key=lambda d: (d["score"], d["index"]))
    return issues, quality


def confused_pairs(labels: list[str], oof: OutOfFold, issues: list[dict]) -> list[dict]:
    """Class pairs that trade labels: flagged rows each way, plus cleanlab's estimate of their overlap."""
    from cleanlab.dataset import find_overlapping_classes

    directed = Counter((d["given"], d["suggested"]) for d in issues)
    rows = np.flatnonzero(oof.scored)
    y = np.searchsorted(oof.classes, [labels[i] for i in rows])
    overlap = find_overlapping_classes(labels=y, pred_probs=oof.proba[rows])
    pairs = []
    for a, b, n, joint in overlap.itertuples(index=False):
        ca, cb = oof.classes[int(a)], oof.classes[int(b)]
        flagged = directed[(ca, cb)] + directed[(cb, ca)]
        if flagged or n:
            pairs.append({"class_a": ca, "class_b": cb, "flagged_a_to_b": directed[(ca, cb)],
                          "flagged_b_to_a": directed[(cb, ca)], "overlap_rows": int(n), "joint": float(joint)})
    pairs.sort(key=lambda d: (-(d["flagged_a_to_b"] + d["flagged_b_to_a"]), -d["overlap_rows"], d["class_a"], d["class_b"]))
    return pairs


# ----------------------------------------------------------------------------- outputs


def _issue_rows(items: AuditItems, issues: list[dict]):
    for rank, d in enumerate(issues, 1):
        i = d["index"]
        yield [rank, items.lines[i] if items.lines else "", items.ids[i], d["given"], d["suggested"], f"{d['score']:.5f}",
               f"{d['p_suggested']:.5f}", items.texts[i] if items.texts is not None else "",
               str(items.paths[i]) if items.paths is not None and items.paths[i] is not None else ""]


def write_cleaned(items: AuditItems, issues: list[dict], action: str, out_dir: Path) -> Path:
    """A cleaned copy in `out_dir`: flagged rows dropped, or given the suggested label. Never the input itself."""
    change = {d["index"]: d["suggested"] for d in issues}
    if items.texts is not None:
        def relabel_or_drop(header: list[str], rows: list[list[str]]):
            col = header.index(LABEL_COLUMN)
            for i, row in enumerate(rows):
                row = (row + [""] * len(header))[:len(header)]  # one cell per column: short rows padded, extras cut
                if i in change:
                    if action == "drop":
                        continue
                    row[col] = change[i]
                yield row

        return write_csv_copy(items.source, out_dir / f"{items.source.stem}.cleaned.csv",
                              f"--out {out_dir}: the cleaned copy would overwrite the input {items.source}; "
                              "pick another folder", relabel_or_drop)
    # A folder-per-class set: a new folder of links (train-image reads it as is), so no image is copied.
    target = out_dir / "cleaned"
    staging = out_dir / ".cleaned.tmp"
    if staging.exists():
        _remove_links(staging)
    for i, (path, label) in enumerate(zip(items.paths or [], items.labels)):
        if i in change and action == "drop":
            continue
        folder = staging / (change.get(i, label))
        folder.mkdir(parents=True, exist_ok=True)
        name = path.name if not (folder / path.name).exists() else f"{label}__{path.name}"
        os.symlink(path.resolve(), folder / name)
    if target.exists():
        _remove_links(target)
    staging.rename(target)
    return target


def _remove_links(folder: Path) -> None:
    """Delete a cleaned folder written by `write_cleaned`: class folders of symlinks, nothing else."""
    for sub in folder.iterdir():
        for link in sub.iterdir():
            if not link.is_symlink():
                raise MuseumError(f"{folder}: holds {link.name}, which is not a link written by museum clean; remove it yourself")
            link.unlink()
        sub.rmdir()
    folder.rmdir()


def run_clean(train_csv: str | Path | None, images: str | Path | None, out: str | Path | None = None, folds: int = 5,
              seed: int = 0, expert: str = "fast", action: str = "report", reuse: bool = False, top: int = TOP_ITEMS,
              embeddings: str | Path | None = None) -> CleanResult:
    """The whole audit: probabilities (trained or reused), issues, confused pairs, page, cleaned copy."""
    from museum.reports.cleaning import clean_page

    if action not in ACTIONS:
        raise MuseumError(f"action {action}: expected one of {', '.join(ACTIONS)}")
    require("cleanlab", "clean")  # before hours of folds, not after them
    items = load_items(train_csv, images)
    out_dir = output_folder(out, "clean", items.source)
    if reuse:
        oof = load_oof(out_dir, items)
        logger.info(f"reusing out-of-fold probabilities from {out_dir / 'oof.npz'} ({', '.join(oof.experts)})")
        saved = {"folds": oof.meta.get("folds"), "seed": oof.meta.get("seed"), "expert": oof.meta.get("expert")}
        asked = {"folds": folds, "seed": seed, "expert": expert}
        if saved != asked:
            logger.warning("--reuse: the saved probabilities were made with "
                           + ", ".join(f"{k} {v}" for k, v in saved.items())
                           + "; the options given for them are ignored (run without --reuse to recompute)")
    else:
        # Embeddings are cached beside the audit: a rerun with other folds or seeds embeds nothing again.
        oof = out_of_fold(items, folds, seed, expert, out_dir / "embeddings.npz", Path(embeddings) if embeddings else None)
        save_oof(oof, out_dir)
    issues, _ = find_issues(items.labels, oof)
    pairs = confused_pairs(items.labels, oof, issues)
    write_csv(out_dir / "label_issues.csv",
               ["rank", "line", "id", "given", "suggested", "score", "p_suggested", "description", "image"],
               _issue_rows(items, issues))
    write_csv(out_dir / "confused_pairs.csv", list(pairs[0]) if pairs else ["class_a", "class_b"],
               [list(p.values()) for p in pairs])
    page = clean_page(out_dir / "label_issues.html", items, oof, issues, pairs, top)
    cleaned = write_cleaned(items, issues, action, out_dir) if action != "report" else None
    text = _summary(items, oof, issues, pairs, out_dir, page, cleaned, action)
    write_json(out_dir / "clean.json", {"oof": oof.meta, "issues": len(issues), "pairs": pairs[:20], "action": action,
                                        "cleaned": str(cleaned) if cleaned else None})
    return CleanResult(out_dir, issues, pairs, page, cleaned, text)


def _summary(items, oof, issues, pairs, out_dir, page, cleaned, action) -> str:
    n = int(oof.scored.sum())
    lines = [f"{items.source}: {len(items.ids):,} rows, {n:,} scored by {' + '.join(oof.experts)} "
             f"({oof.meta['expert'] if 'text' in oof.experts else 'embeddings'}, {oof.meta['folds']} folds, "
             f"seed {oof.meta['seed']})",
             f"label issues: {len(issues):,} ({len(issues) / max(n, 1):.1%} of scored rows) → {out_dir / 'label_issues.csv'}"]
    for d in issues[:5]:
        lines.append(f"  {items.ids[d['index']]}: {d['given']} → {d['suggested']} (score {d['score']:.3f})")
    if pairs:
        lines.append("most confused pairs (flagged a→b / b→a):")
        for p in pairs[:5]:
            lines.append(f"  {p['class_a']} ↔ {p['class_b']}: {p['flagged_a_to_b']} / {p['flagged_b_to_a']}")
    if cleaned is not None:
        verb = "dropped" if action == "drop" else "relabelled"
        lines.append(f"cleaned copy ({len(issues):,} rows {verb}): {cleaned}")
    lines.append(f"page: {page}")
    return "\n".join(lines)


def read_issues(path: str | Path) -> list[dict]:
    """label_issues.csv back as dicts (for scripts and tests)."""
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))

