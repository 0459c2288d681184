"""Duplicate images: exact (same bytes) and near (embedding cosine, confirmed by a crop hash), as groups.

- Exact: the SHA-256 of each file's bytes.
- Near: cosine similarity of pooled ImageNet-backbone embeddings (`museum.image.embed.image_embeddings`:
  one pass, cached in an .npz keyed by the files and settings). Similarities are computed a block
  of rows at a time against the rows after them, so memory is `BLOCK × n` floats, never n × n
  (tens of thousands of images stay within ~50 MB), and only pairs above the threshold are kept.
- A second, independent signal for pairs the embedding is unsure about: a DCT perceptual hash
  (pHash, 255 bits) of centre crops at several ratios. Cropping and resizing move an image's
  embedding (faces: cosine 0.66–0.96 for a 3–8 % crop), but a crop of one image at the right
  ratio matches the other's full frame bit for bit up to JPEG noise. A pair is a near duplicate
  when the cosine is ≥ the threshold, OR when it is ≥ `HASH_FLOOR` AND the smallest hash
  distance over crop-ratio pairs is ≤ `MAX_HASH`: each signal alone is noisy on look-alike
  frames, both together rarely agree by chance.

Pairs are joined into groups as connected components (a copy of a copy is one group). Groups are dicts
(`kind`, `members` (row indices), `similarity`), like `museum.data.competition.text_groups`
for descriptions; `museum.data.competition.leak_free_split` keeps each on one side of a split,
and `museum dedup` (`museum.dedup`) reports them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from museum.data.files import open_regular
from museum.image.embed import image_embeddings
from museum.utils import sha256_stream

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


def file_hash(path: Path | None) -> str | None:
    """SHA-256 of the file's bytes, streamed; None for a missing or unreadable file."""
    if path is None:
        return None
    try:
        with open_regular(path) as f:
            return sha256_stream(f)
    except OSError:
        return None


def crop_hashes(img) -> np.ndarray:
    """pHash bits of `img`'s centre crops at `CROP_RATIOS`, packed: (len(CROP_RATIOS), 32) uint8.

    Not the `imagehash` package's phash: that one keeps 8 × 8 frequencies with the DC term (64 bits, one crop);
    `MAX_HASH` was chosen on these 255 bits (16 × 16 less DC) over several crops."""
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
    from museum.data.images import ImageDecodeError, safe_open_image  # torch, imported once there are images

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
    distance ≤ `max_hash`; rows are unit vectors, compared a block at a time.

    Hand-written rather than scikit-learn's `pairwise_distances_chunked`: each block is multiplied only by the
    rows after it (half the products), 1.6 s against 2.5 s for 6,000 × 1,280 features, same pairs."""
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


def _first_rows(file_hashes: Sequence[str | None]) -> dict[str, int]:
    """Each distinct hash's first row."""
    first: dict[str, int] = {}
    for i, h in enumerate(file_hashes):
        if h is not None:
            first.setdefault(h, i)
    return first


def join_groups(file_hashes: Sequence[str | None], pairs: Sequence[tuple[int, int, float]]) -> list[dict]:
    """The groups of rows joined by the same bytes (equal `file_hashes`) or by near `pairs` (i, j, cosine),
    a copy of a copy in the same group: the connected components (scipy) of the graph of those links.

    Groups come in the order of their first row, members ascending; a group's `similarity` is its lowest
    pair cosine (1.0 when all its files are the same bytes)."""
    n = len(file_hashes)
    first_of = _first_rows(file_hashes)
    same_bytes = [(first_of[h], i) for i, h in enumerate(file_hashes) if h is not None]
    near = np.array([(i, j) for i, j, _ in pairs], dtype=np.int64).reshape(-1, 2)
    links = np.vstack([np.array(same_bytes, dtype=np.int64).reshape(-1, 2), near])
    graph = coo_matrix((np.ones(len(links), dtype=np.int8), (links[:, 0], links[:, 1])), shape=(n, n))
    # Components are numbered from the lowest unvisited row on, so in the order of their first row.
    count, component = connected_components(graph, directed=False)
    lowest = np.ones(count)
    np.minimum.at(lowest, component[near[:, 0]], np.array([s for _, _, s in pairs], dtype=np.float64))
    members = np.split(np.argsort(component, kind="stable"), np.cumsum(np.bincount(component, minlength=count))[:-1])
    groups = []
    for k, rows in enumerate(members):
        if len(rows) > 1:
            rows = rows.tolist()
            exact = len({file_hashes[i] for i in rows}) == 1
            groups.append({"kind": "exact" if exact else "near", "members": rows,
                           "similarity": 1.0 if exact else float(lowest[k])})
    return groups


def image_groups(paths: Sequence[Path | None], threshold: float = DEFAULT_THRESHOLD, cache_file: Path | None = None,
                 device: str = "auto", embeddings: Path | None = None) -> list[dict]:
    """Exact (same bytes) and near (cosine ≥ threshold, or crop hash confirming a cosine ≥ `HASH_FLOOR`) image
    duplicate groups, as dicts with `members`."""
    hashes = [file_hash(p) for p in paths]
    feats, ok = image_embeddings(paths, cache_file, device, given=embeddings)
    # Exact copies share a group anyway: compare one embedding per distinct file.
    first = np.zeros(len(paths), dtype=bool)
    first[list(_first_rows(hashes).values())] = True
    crops, hashed = image_hashes(paths, ok & first)
    return join_groups(hashes, similar_pairs(feats, ok & first, threshold, hashes=crops, hash_ok=hashed))


def finish_groups(groups: list[dict], labels: Sequence[str] | None) -> list[dict]:
    """Number the groups (conflicting, then largest, first) and flag label conflicts in image groups."""
    for g in groups:
        g.setdefault("conflicting", labels is not None and len({labels[i] for i in g["members"]}) > 1)
    groups.sort(key=lambda g: (not g["conflicting"], -len(g["members"]), g["kind"], g["members"][0]))
    for k, g in enumerate(groups, 1):
        g["group"] = k
    return groups


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
