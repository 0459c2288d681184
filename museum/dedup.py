"""`museum dedup`: exact, near and text duplicates, and splits that keep each group on one side.

- Exact: the SHA-256 of each file's bytes.
- Near: cosine similarity of pooled ImageNet-backbone embeddings (`museum.image.embed`: one
  pass, cached in an .npz keyed by the files and settings). Similarities are computed a block
  of rows at a time against the rows after them, so memory is `BLOCK × n` floats, never n × n
  (tens of thousands of images stay within ~50 MB), and only pairs above the threshold are kept.
- A second, independent signal for pairs the embedding is unsure about: a DCT perceptual hash
  (pHash, 255 bits) of centre crops at several ratios. Cropping and resizing move an image's
  embedding (faces: cosine 0.66–0.96 for a 3–8 % crop), but a crop of one image at the right
  ratio matches the other's full frame bit for bit up to JPEG noise. A pair is a near duplicate
  when the cosine is ≥ the threshold, OR when it is ≥ `HASH_FLOOR` AND the smallest hash
  distance over crop-ratio pairs is ≤ `MAX_HASH`: each signal alone is noisy on look-alike
  frames, both together rarely agree by chance.
- Text: descriptions equal after `normalise_description` (case and spacing); groups whose rows
  carry more than one label are flagged as conflicting.

Pairs are joined into groups by union-find (a copy of a copy is one group). `split_leaks` and
`leak_free_split` let a trainer check or ensure that no group straddles train and validation.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from museum.data.competition import guid_image_paths, normalise_description, read_competition_csv, stratified_split
from museum.data.files import file_problem, open_regular, skipped_text
from museum.errors import MuseumError
from museum.log import logger
from museum.utils import atomic_path, output_folder, write_json

# Chosen on scripts/bench_dedup.py (simpsons_small and quintuplets_faces, seeds 0/1): recall and
# precision stay ≥ 0.95 for thresholds 0.95–0.97, floors 0.5–0.7 and hash limits 0.14–0.16; the
# values sit in the middle of that plateau rather than at the best point of one set.
DEFAULT_THRESHOLD = 0.96  # cosine alone
HASH_FLOOR = 0.6  # cosine from which the crop hash may confirm a pair (below it: different content)
MAX_HASH = 0.15  # largest share of differing hash bits for a confirmed pair (unrelated frames: ≥ 0.3 typical)
CROP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8)  # centre crops hashed: covers crops of up to 10 % per side
HASH_SIDE, HASH_KEEP = 32, 16  # pHash: grey 32×32, the 16×16 lowest DCT frequencies less the mean
BLOCK = 256  # rows of the similarity matrix held at once
PAIR_CHUNK = 16384  # candidate pairs whose hash distances are computed at once (~13 MB)
KEEP = ("all", "one")
TOP_GROUPS = 200  # groups shown on the page; the CSV lists all


@dataclass
class DedupItems:
    source: Path
    names: list[str]  # guid, or path relative to the folder
    paths: list[Path | None] | None = None
    labels: list[str] | None = None
    texts: list[str] | None = None
    lines: list[int] = field(default_factory=list)


# ----------------------------------------------------------------------------- input


def load_dedup_items(path: str | Path, images: str | Path | None = None) -> DedupItems:
    """A folder (per-class sub-folders, or images directly inside) or a competition CSV with optional `images/{guid}.jpg`."""
    from museum.data.images import IMAGE_SUFFIXES, list_image_folder

    path = Path(path)
    if not path.exists():
        raise MuseumError(f"{path}: not found; give a folder of images or a competition CSV")
    if path.is_dir():
        # Class sub-folders; a folder named like an image (x.jpg) is a bad image in a flat folder, not a class.
        if any(p.is_dir() and not p.name.startswith(".") and p.suffix.lower() not in IMAGE_SUFFIXES
               for p in path.iterdir()):
            found = list_image_folder(path)
            paths, labels = list(found.paths), list(found.labels)
        else:
            named = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
            # Only regular files: a FIFO named x.jpg would block the hashing forever.
            problems = {p: file_problem(p) for p in named}
            skipped = Counter(problem for problem in problems.values() if problem is not None)
            paths, labels = [p for p, problem in problems.items() if problem is None], None
            if skipped:
                logger.warning(f"{path}: skipped {sum(skipped.values())} image name(s) that are not files to read: "
                               f"{skipped_text(skipped)}")
            if not paths:
                found = f" ({skipped_text(skipped)} skipped)" if skipped else ""
                raise MuseumError(f"{path}: no images found{found} (suffixes {', '.join(IMAGE_SUFFIXES)})")
        return DedupItems(path, [p.relative_to(path).as_posix() for p in paths], paths, labels)
    from museum.reports.eda import read_labels

    table = read_competition_csv(path)
    # Labels are optional here (a test file has none): only conflicts need them.
    items = DedupItems(path, table.guids, None, read_labels(path, len(table), table.lines), table.descriptions, table.lines)
    if images is not None:
        items.paths = guid_image_paths(path, table.guids, images, "check --images, or drop it to compare descriptions only")
    return items


# ----------------------------------------------------------------------------- finding duplicates


def file_hash(path: Path | None) -> str | None:
    """SHA-256 of the file's bytes, streamed; None for a missing or unreadable file."""
    if path is None:
        return None
    h = hashlib.sha256()
    try:
        with open_regular(path) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def image_embeddings(paths: Sequence[Path | None], cache_file: Path | None = None, device: str = "auto",
                     input_size: int = 0, features: str = "pooled",
                     given: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(L2-normalised float32 embeddings (n, d), readable mask), one MobileNetV2 pass cached in `cache_file`.

    `features`: see `museum.image.embed.FEATURES` (duplicates are found on `pooled` ones). `given`: a file
    written by `museum embed` to read rows from instead (never rewritten); it must hold `features`."""
    from museum.image.backbones import IMAGENET_MEAN, IMAGENET_STD
    from museum.image.embed import embed_spec, load_embeddings, load_or_embed, resolve_input_size
    from museum.utils import resolve_device

    present = [Path(p) for p in paths if p is not None]
    if not present:
        return np.zeros((len(paths), 1), dtype=np.float32), np.zeros(len(paths), dtype=bool)
    if given is not None:
        emb = load_embeddings(given)
        if emb.meta.get("features") != features:
            raise MuseumError(f"--embeddings {given}: holds {emb.meta.get('features')} features, this needs {features}; "
                              f"write them with `museum embed --features {features}`")
    else:
        spec = embed_spec("mobilenet_v2", "imagenet", resolve_input_size(input_size, present), IMAGENET_MEAN,
                          IMAGENET_STD, features=features)
        emb = load_or_embed(present, [""] * len(present), spec, cache_file, device=resolve_device(device))
    rows = np.array([-1 if p is None else r for p, r in zip(paths, _rows_of(emb, paths))], dtype=np.int64)
    if given is not None:
        missing = sum(1 for p, r in zip(paths, rows) if p is not None and r < 0)
        if missing == len(present):
            raise MuseumError(f"--embeddings {given}: none of these {len(present)} images is in it; "
                              "embed this folder (museum embed) or drop --embeddings")
        if missing:
            logger.warning(f"--embeddings {given}: {missing} of {len(present)} images have no row (unreadable when "
                           "it was written, or not in it); they are left out")
    ok = rows >= 0
    feats = np.zeros((len(paths), emb.features.shape[1]), dtype=np.float32)
    feats[ok] = emb.features[rows[ok]]
    feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    return feats, ok


def _rows_of(emb, paths) -> np.ndarray:
    return emb.rows([p if p is not None else "\0" for p in paths])


def crop_hashes(img) -> np.ndarray:
    """pHash bits of `img`'s centre crops at `CROP_RATIOS`, packed: (len(CROP_RATIOS), 32) uint8."""
    from PIL import Image
    from scipy.fft import dctn

    grey = img.convert("L")
    w, h = grey.size
    rows = []
    for r in CROP_RATIOS:
        box = ((w - w * r) / 2, (h - h * r) / 2, (w + w * r) / 2, (h + h * r) / 2)
        small = np.asarray(grey.resize((HASH_SIDE, HASH_SIDE), Image.BILINEAR, box=box, reducing_gap=2.0), dtype=np.float32)
        low = dctn(small, norm="ortho")[:HASH_KEEP, :HASH_KEEP].ravel()[1:]  # the DC term only says "bright"
        rows.append(np.packbits(low > np.median(low)))
    return np.stack(rows)


def image_hashes(paths: Sequence[Path | None], wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(crop hashes (n, ratios, 32) uint8, mask of rows hashed) for the rows in `wanted`; unreadable files are left out."""
    from museum.data.images import ImageDecodeError, safe_open_image

    hashes = np.zeros((len(paths), len(CROP_RATIOS), (HASH_KEEP * HASH_KEEP - 1 + 7) // 8), dtype=np.uint8)
    done = np.zeros(len(paths), dtype=bool)
    for i in np.flatnonzero(wanted):
        try:
            # draft: the JPEG decoder shrinks while decoding; a 32-pixel hash needs no more than 64.
            hashes[i] = crop_hashes(safe_open_image(paths[i], draft=64))
            done[i] = True
        except (ImageDecodeError, OSError):
            pass
    return hashes, done


def hash_distance(hashes: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Share of differing bits between rows a and b, the smallest over all pairs of crop ratios.

    Any pair, not only full frame against crop: a copy cropped unevenly (more at the top than the
    sides) matches best when both are cropped a little."""
    bits = HASH_KEEP * HASH_KEEP - 1
    out = np.empty(len(a), dtype=np.float32)
    for start in range(0, len(a), PAIR_CHUNK):
        x = hashes[a[start:start + PAIR_CHUNK], :, None, :] ^ hashes[b[start:start + PAIR_CHUNK], None, :, :]
        out[start:start + PAIR_CHUNK] = np.bitwise_count(x).sum(axis=-1, dtype=np.int32).min(axis=(1, 2)) / bits
    return out


def similar_pairs(feats: np.ndarray, ok: np.ndarray, threshold: float, block: int = BLOCK,
                  hashes: np.ndarray | None = None, hash_ok: np.ndarray | None = None,
                  floor: float = HASH_FLOOR, max_hash: float = MAX_HASH) -> list[tuple[int, int, float]]:
    """(i, j, cosine) for i < j with cosine ≥ threshold, or (given `hashes`) cosine ≥ `floor` and crop-hash
    distance ≤ `max_hash`; rows are unit vectors, compared a block at a time."""
    idx = np.flatnonzero(ok)
    x = feats[idx]
    hashed = hash_ok[idx] if hashes is not None else None
    pairs = []
    for start in range(0, len(x), block):
        sims = x[start:start + block] @ x[start:].T  # (block, rows from `start` on): upper triangle only
        a, b = np.nonzero(sims >= (min(threshold, floor) if hashes is not None else threshold))
        keep = b > a  # the diagonal (and the lower part of the first columns) are not pairs
        a, b = a[keep], b[keep]
        s = sims[a, b]
        if hashes is not None:
            unsure = np.flatnonzero((s < threshold) & hashed[start + a] & hashed[start + b])
            confirmed = np.zeros(len(s), dtype=bool)
            confirmed[unsure] = hash_distance(hashes, idx[start + a[unsure]], idx[start + b[unsure]]) <= max_hash
            keep = (s >= threshold) | confirmed
            a, b, s = a[keep], b[keep], s[keep]
        pairs.extend(zip(idx[start + a].tolist(), idx[start + b].tolist(), s.tolist()))
    return pairs


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def image_groups(paths: Sequence[Path | None], threshold: float = DEFAULT_THRESHOLD, cache_file: Path | None = None,
                 device: str = "auto", embeddings: Path | None = None) -> list[dict]:
    """Exact (same bytes) and near (cosine ≥ threshold, or crop hash confirming a cosine ≥ `HASH_FLOOR`) image
    duplicate groups, as dicts with `members`."""
    hashes = [file_hash(p) for p in paths]
    uf = _UnionFind(len(paths))
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(hashes):
        if h is not None:
            by_hash[h].append(i)
    for members in by_hash.values():
        for j in members[1:]:
            uf.union(members[0], j)
    feats, ok = image_embeddings(paths, cache_file, device, given=embeddings)
    # Exact copies already share a group: compare one embedding per distinct file.
    first = np.zeros(len(paths), dtype=bool)
    first[[m[0] for m in by_hash.values()]] = True
    lowest: dict[int, float] = {}
    crops, hashed = image_hashes(paths, ok & first)
    pairs = similar_pairs(feats, ok & first, threshold, hashes=crops, hash_ok=hashed)
    for i, j, s in pairs:
        uf.union(i, j)
    components: dict[int, list[int]] = defaultdict(list)
    for i in range(len(paths)):
        components[uf.find(i)].append(i)
    for i, j, s in pairs:
        root = uf.find(i)
        lowest[root] = min(lowest.get(root, 1.0), s)
    groups = []
    for root, members in components.items():
        if len(members) > 1:
            exact = len({hashes[i] for i in members}) == 1
            groups.append({"kind": "exact" if exact else "near", "members": members,
                           "similarity": 1.0 if exact else lowest.get(root, 1.0)})
    return groups


def text_groups(texts: Sequence[str], labels: Sequence[str] | None = None) -> list[dict]:
    """Rows whose descriptions are equal after normalisation; `conflicting` when they carry more than one label."""
    rows_of: dict[str, list[int]] = defaultdict(list)
    for i, text in enumerate(texts):
        key = normalise_description(text)
        if key:
            rows_of[key].append(i)
    return [{"kind": "text", "members": rows, "similarity": 1.0,
             "conflicting": labels is not None and len({labels[i] for i in rows}) > 1}
            for rows in rows_of.values() if len(rows) > 1]


def _finish(groups: list[dict], labels: Sequence[str] | None) -> list[dict]:
    """Number the groups (conflicting, then largest, first) and flag label conflicts in image groups."""
    for g in groups:
        g.setdefault("conflicting", labels is not None and len({labels[i] for i in g["members"]}) > 1)
    groups.sort(key=lambda g: (not g["conflicting"], -len(g["members"]), g["kind"], g["members"][0]))
    for k, g in enumerate(groups, 1):
        g["group"] = k
    return groups


# ----------------------------------------------------------------------------- splits without leaks


def split_leaks(groups: Iterable, train_idx: Sequence[int], val_idx: Sequence[int]) -> list[list[int]]:
    """Groups (lists of row indices, or dicts with `members`) that have rows in both train and validation."""
    train, val = set(map(int, train_idx)), set(map(int, val_idx))
    leaks = []
    for g in groups:
        members = [int(i) for i in (g["members"] if isinstance(g, dict) else g)]
        if any(i in train for i in members) and any(i in val for i in members):
            leaks.append(members)
    return leaks


def leak_free_split(labels: Sequence[str], groups: Iterable, val_fraction: float = 0.2,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`stratified_split`, then each straddling group moved whole to the side most of it fell on (train on ties).

    The split stays stratified up to the few moved rows, and `split_leaks` of the result is empty."""
    train_idx, val_idx = stratified_split(list(labels), val_fraction, seed)
    side = np.zeros(len(labels), dtype=bool)  # True = validation
    side[val_idx] = True
    for members in split_leaks(groups, train_idx, val_idx):
        side[members] = side[members].sum() * 2 > len(members)
    return np.flatnonzero(~side), np.flatnonzero(side)


# ----------------------------------------------------------------------------- keep one


def keep_one(n: int, groups: list[dict], labels: Sequence[str] | None) -> np.ndarray:
    """Row indices to keep: one per group (one carrying the group's majority label, the earliest on ties), all others."""
    drop = np.zeros(n, dtype=bool)
    for g in groups:
        members = sorted(g["members"])
        keep = members[0]
        if labels is not None:
            majority = Counter(labels[i] for i in members).most_common(1)[0][0]
            keep = next(i for i in members if labels[i] == majority)
        drop[[i for i in members if i != keep]] = True
    return np.flatnonzero(~drop)


def _keep_groups(groups: list[dict], with_images: bool) -> list[dict]:
    # With images, identical descriptions ("Открытка") usually name different objects: only image groups decide.
    return [g for g in groups if g["kind"] != "text"] if with_images else groups


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> Path:
    """A UTF-8 CSV written atomically: `header`, then `rows`."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
    return path


def write_csv_copy(source: Path, target: Path, overwrite_error: str,
                   select: Callable[[list[str], list[list[str]]], Iterable[Sequence]]) -> Path:
    """`target`: the header of the CSV `source` and the rows `select(header, rows)` makes of its data rows.

    The original rows are re-read so that any extra columns and their order survive unchanged (blank
    lines skipped, as the competition reader does). Refuses, with `overwrite_error`, to write over `source`."""
    if target.resolve() == source.resolve():
        raise MuseumError(overwrite_error)
    with open(source, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        rows = [r for r in reader if any(cell.strip() for cell in r)]
    return write_csv(target, header, select(header, rows))


def write_kept(items: DedupItems, keep: np.ndarray, out_dir: Path) -> Path:
    """The deduplicated CSV (original columns, kept rows) or, for a folder, a path,label file list."""
    if items.texts is not None:
        keep_set = set(keep.tolist())
        return write_csv_copy(items.source, out_dir / f"{items.source.stem}.dedup.csv",
                              f"--out {out_dir}: the deduplicated copy would overwrite the input {items.source}",
                              lambda header, rows: (r for i, r in enumerate(rows) if i in keep_set))
    return write_csv(out_dir / "kept.csv", ["path", "label"],
                     ([str(items.paths[i]), items.labels[i] if items.labels else ""] for i in keep))


# ----------------------------------------------------------------------------- the command


@dataclass
class DedupResult:
    out_dir: Path
    groups: list[dict]
    page: Path
    kept: Path | None
    text: str


def run_dedup(path: str | Path, images: str | Path | None = None, out: str | Path | None = None,
              threshold: float = DEFAULT_THRESHOLD, keep: str = "all", device: str = "auto",
              embeddings: str | Path | None = None) -> DedupResult:
    """Find groups, write groups.csv, dedup.html and (with keep="one") the deduplicated list or CSV."""
    import time

    from museum.reports.cleaning import dedup_page

    if not 0.0 < threshold <= 1.0:
        raise MuseumError(f"--threshold {threshold}: must be in (0, 1]; cosine similarity of embeddings")
    if keep not in KEEP:
        raise MuseumError(f"--keep {keep}: expected one of {', '.join(KEEP)}")
    items = load_dedup_items(path, images)
    out_dir = output_folder(out, "dedup", items.source)
    start = time.perf_counter()
    groups: list[dict] = []
    if items.paths is not None:
        groups += image_groups(items.paths, threshold, out_dir / "embeddings.npz", device,
                               Path(embeddings) if embeddings else None)
    if items.texts is not None:
        groups += text_groups(items.texts, items.labels)
    groups = _finish(groups, items.labels)
    seconds = time.perf_counter() - start
    _write_groups(out_dir / "groups.csv", items, groups)
    page = dedup_page(out_dir / "dedup.html", items.source, groups, items.names, items.paths, items.labels, items.texts,
                      TOP_GROUPS)
    kept = None
    if keep == "one":
        kept = write_kept(items, keep_one(len(items.names), _keep_groups(groups, items.paths is not None), items.labels),
                          out_dir)
    counts = Counter(g["kind"] for g in groups)
    summary = {"source": str(items.source), "items": len(items.names), "threshold": threshold, "groups": dict(counts),
               "duplicate_rows": sum(len(g["members"]) - 1 for g in _keep_groups(groups, items.paths is not None)),
               "conflicting_groups": sum(g["conflicting"] for g in groups), "seconds": round(seconds, 2),
               "kept": str(kept) if kept else None}
    write_json(out_dir / "dedup.json", summary)
    lines = [f"{items.source}: {len(items.names):,} items in {seconds:.1f}s",
             "groups: " + (", ".join(f"{counts[k]:,} {k}" for k in ("exact", "near", "text") if counts[k]) or "none")
             + f"; {summary['conflicting_groups']:,} with conflicting labels",
             f"groups: {out_dir / 'groups.csv'}"]
    if kept is not None:
        lines.append(f"kept one per group ({summary['duplicate_rows']:,} rows left out): {kept}")
    lines.append(f"page: {page}")
    logger.debug(f"dedup summary: {summary}")
    return DedupResult(out_dir, groups, page, kept, "\n".join(lines))


def _write_groups(path: Path, items: DedupItems, groups: list[dict]) -> None:
    write_csv(path, ["group", "kind", "similarity", "conflicting", "row", "id", "label", "image", "description"],
              ([g["group"], g["kind"], f"{g['similarity']:.4f}", int(g["conflicting"]),
                items.lines[i] if items.lines else i, items.names[i],
                items.labels[i] if items.labels else "",
                str(items.paths[i]) if items.paths is not None and items.paths[i] is not None else "",
                items.texts[i] if items.texts is not None and g["kind"] == "text" else ""]
               for g in groups for i in g["members"]))
