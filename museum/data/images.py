"""Read image datasets safely and decode each image once per run.

Two layouts: folder-per-class (`DIR/<class>/*.jpg`) and the competition's
(`train.csv` + `DIR/{guid}.jpg`). Every file goes through `safe_open_image`, which refuses
missing, empty, truncated, non-image and oversized files, and anything that is not a regular file
(a FIFO would block forever: `museum.data.files`), with an `ImageDecodeError` instead of crashing
or hanging; the dataset readers skip such files and count them by reason.

`decode_cache` turns a list of paths into one uint8 tensor (N, 3, S, S), decoded and
resized once (in DataLoader workers) so that every later epoch only does tensor work. The
resize uses the backbone's pretrained interpolation (bilinear for torchvision's, bicubic for
most of timm's), the same one at training, embedding and prediction; the on-disk cache keys
on it with the size.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from museum.data.competition import is_safe_id, read_competition_csv
from museum.data.files import FileProblem, file_problem, open_regular, skipped_text
from museum.errors import MuseumError
from museum.log import logger, progress_bar
from museum.utils import atomic_path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Refuse anything above 64 megapixels (an 8k x 8k photo): decoding it would take ~200 MB and
# seconds, and such files in a catalogue are bombs or scanning accidents, not item photos.
MAX_PIXELS = 64_000_000
MAX_SIDE = 30_000
NAMED_FAILURES = 5  # unreadable images named in the log at the default level
MAX_FILE_BYTES = 200 * 1024 * 1024
# Never decode a truncated JPEG into grey garbage: it must be reported as broken.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# PIL filters by the names pretrained configs give (`interpolation` of timm's and torchvision's weights).
RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
            "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


class ImageDecodeError(MuseumError):
    """An image file that cannot be used; `reason` is a short word for counting."""

    def __init__(self, path: str | Path | None, reason: str, detail: str = ""):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}{f' ({detail})' if detail else ''}; replace or remove the file")


def _check_size(path, width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1 or max(width, height) > MAX_SIDE:
        raise ImageDecodeError(path, "absurd size", f"{width}x{height} pixels, sides limited to 1..{MAX_SIDE}")
    if width * height > max_pixels:
        raise ImageDecodeError(path, "absurd size", f"{width}x{height} pixels, limit {max_pixels:,} pixels")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode as RGB: transparency on white, 16-bit greys scaled, CMYK converted."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        hi = float(arr.max()) or 1.0
        # 16-bit scans use the full 0..65535 range; 8-bit data stored as I stays as is.
        scale = 255.0 / 65535.0 if hi > 255 else 1.0
        return Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_bytes(data: bytes, path=None, draft: int | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode image bytes into an upright RGB image, or raise `ImageDecodeError`.

    `draft` lets the JPEG decoder shrink by 2/4/8 while decoding when only a small
    image (at least `draft` pixels a side) is needed: several times faster on photos.
    """
    if not data:
        raise ImageDecodeError(path, "zero-byte file")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that: make it an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            _check_size(path, *img.size, max_pixels)
            if draft and img.format == "JPEG":
                img.draft("RGB", (draft, draft))
            img.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecodeError(path, "absurd size", "Pillow refused it as a possible decompression bomb") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not an image") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        raise ImageDecodeError(path, "truncated or corrupt", str(exc)[:80]) from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not lose an otherwise good image
        pass
    return to_rgb(img)


def read_bytes(path: str | Path) -> bytes:
    """The file's bytes, or `ImageDecodeError` for a missing, special (FIFO, folder…) or oversized file."""
    path = Path(path)
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_FILE_BYTES:
                raise ImageDecodeError(path, "absurd size", f"{size} bytes")
            return f.read()
    except FileProblem as exc:
        raise ImageDecodeError(path, exc.reason) from None
    except OSError as exc:
        raise ImageDecodeError(path, "unreadable", exc.strerror or "") from None


def safe_open_image(path: str | Path, draft: int | None = None) -> Image.Image:
    """Open `path` as an upright RGB image, raising `ImageDecodeError(reason)` when it can't be used."""
    return decode_bytes(read_bytes(path), path, draft)


def resample_filter(interpolation: str) -> int:
    """The PIL filter named `interpolation` (a `RESAMPLE` key), or one MuseumError line."""
    try:
        return RESAMPLE[interpolation]
    except KeyError:
        raise MuseumError(f"interpolation {interpolation!r}: expected one of {', '.join(RESAMPLE)}") from None


def image_to_tensor(img: Image.Image, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """RGB image squashed to size x size with `interpolation`, as uint8 (3, size, size); the whole frame is kept."""
    if img.size != (size, size):
        img = img.resize((size, size), resample_filter(interpolation), reducing_gap=3.0)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------- datasets


@dataclass
class ImageItems:
    """Labelled image paths, plus what was skipped while listing them."""

    paths: list[Path]
    labels: list[str]
    skipped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.paths)


def list_image_folder(root: str | Path, option: str = "--images") -> ImageItems:
    """`root/<class>/*.{jpg,jpeg,png,bmp,webp}` as items; classes are the sub-folder names.

    Image-named entries that are not regular files (FIFOs, folders, links to them) are skipped and
    counted, and class folders left without any image are named: both in one warning each, here,
    since every caller would otherwise have to repeat it. `option` is how the user gave `root`
    (an option name, or "" for a positional argument), for messages."""
    root = Path(root)
    name = f"{option} {root}" if option else str(root)
    if not root.is_dir():
        raise MuseumError(f"{name}: not a folder; expected DIR/<class>/*.jpg (or --train CSV with DIR/<guid>.jpg)")
    items, empty = ImageItems([], []), []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = 0
        for f in sorted(class_dir.iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES or f.name.startswith("."):
                continue
            problem = file_problem(f)
            if problem is None:
                items.paths.append(f)
                items.labels.append(class_dir.name)
                found += 1
            else:
                items.skipped[problem] += 1
                logger.debug(f"{f}: {problem}; skipped")
        if not found:
            empty.append(class_dir.name)
    if items.skipped:
        logger.warning(f"{name}: skipped {sum(items.skipped.values())} image name(s) that are not files to read: "
                       f"{skipped_text(items.skipped)}")
    if not items.paths:
        skipped = f" ({skipped_text(items.skipped)} skipped)" if items.skipped else ""
        raise MuseumError(
            f"{name}: no images found in class sub-folders{skipped}; expected DIR/<class>/*.jpg "
            f"(suffixes {', '.join(IMAGE_SUFFIXES)})"
        )
    if empty:
        shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        logger.warning(f"{name}: {len(empty)} class folder(s) hold no image file, so these classes are left out: {shown}")
    return items


def list_competition_images(train_csv: str | Path, images: str | Path) -> ImageItems:
    """Rows of `train_csv` whose image `images/{guid}.jpg` is a regular file; the rest are counted in `skipped`
    by reason (unsafe guid, missing, not a regular file (FIFO)…), which the caller reports."""
    images = Path(images)
    if not images.is_dir():
        raise MuseumError(f"--images {images}: not a folder; expected DIR/{{guid}}.jpg for the rows of {train_csv}")
    table = read_competition_csv(train_csv, require_labels=True)
    items = ImageItems([], [])
    for guid, label, line in zip(table.guids, table.labels or [], table.lines):
        if not is_safe_id(guid):
            logger.warning(f"{train_csv} line {line}, field guid: {guid[:40]!r} is not a safe file name; row skipped")
            items.skipped["unsafe guid"] += 1
            continue
        path = images / f"{guid}.jpg"
        problem = file_problem(path)
        if problem is not None:
            items.skipped[problem] += 1
            continue
        items.paths.append(path)
        items.labels.append(label)
    if not items.paths:
        raise MuseumError(f"{train_csv}: none of its {len(table)} rows has an image {images}/{{guid}}.jpg "
                          f"({skipped_text(items.skipped)}); check --images")
    return items


def probe_median_side(paths: list[Path], n: int = 200, seed: int = 0) -> int:
    """Median shorter side of up to `n` images, from their headers only (no decoding)."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(paths), size=min(n, len(paths)), replace=False) if paths else []
    sides = []
    for i in pick:
        try:
            with warnings.catch_warnings():  # a huge header is refused, with its name, by the decoder
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with open_regular(paths[int(i)]) as f, Image.open(f) as img:  # never a FIFO: it would block
                    sides.append(min(img.size))
        except Exception:  # bad files are reported later, by the decoder
            continue
    return int(np.median(sides)) if sides else 0


# ----------------------------------------------------------------------------- decode once


class DecodeDataset(torch.utils.data.Dataset):
    """Paths → (uint8 tensor (3, S, S) or None, failure reason) through the safe decoder.

    With `cache_dir`, decoded arrays are also kept on disk keyed by the file's content
    hash, the size and the interpolation, so a second run (or another process) skips the decoding.
    """

    def __init__(self, paths: list[Path | None], size: int, cache_dir: Path | None = None,
                 interpolation: str = "bilinear"):
        resample_filter(interpolation)  # an unknown name fails here, not in every worker
        self.paths, self.size, self.cache_dir, self.interpolation = paths, size, cache_dir, interpolation

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        path = self.paths[i]
        if path is None:
            return i, None, "missing"
        try:
            data = read_bytes(path)
            cached = None
            if self.cache_dir is not None and data:
                key = hashlib.sha1(data).hexdigest()
                # Bilinear entries keep the name they had before other interpolations came in.
                method = "" if self.interpolation == "bilinear" else f"_{self.interpolation}"
                cached = self.cache_dir / key[:2] / f"{key}_{self.size}{method}.npy"
                if cached.exists():
                    try:
                        return i, torch.from_numpy(np.load(cached)), ""
                    except (OSError, ValueError):  # a damaged cache entry is just re-decoded
                        pass
            tensor = image_to_tensor(decode_bytes(data, path, draft=self.size), self.size, self.interpolation)
            if cached is not None:
                _save_npy(cached, tensor.numpy())
            return i, tensor, ""
        except ImageDecodeError as exc:
            return i, None, exc.reason


def _save_npy(path: Path, arr: np.ndarray) -> None:
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, arr)
    except OSError as exc:  # a full or read-only cache disk only costs speed
        logger.debug(f"decode cache: cannot write {path}: {exc}")


def _collate(batch):
    return batch


def decode_loader(paths: list[Path | None], size: int, batch_size: int = 64, num_workers: int = 2,
                  cache_dir: Path | None = None, interpolation: str = "bilinear") -> torch.utils.data.DataLoader:
    """A DataLoader yielding lists of (index, tensor or None, reason), decoded in workers."""
    return torch.utils.data.DataLoader(
        DecodeDataset(paths, size, cache_dir, interpolation), batch_size=batch_size, shuffle=False,
        num_workers=min(num_workers, max(0, len(paths) // batch_size)), collate_fn=_collate,
        persistent_workers=False,
    )


def decode_cache(paths: list[Path | None], size: int, num_workers: int = 2, cache_dir: Path | None = None,
                 progress: bool = False, interpolation: str = "bilinear") -> tuple[torch.Tensor, np.ndarray, Counter]:
    """Decode and resize every image once: (uint8 (N, 3, S, S), ok mask (N,), failures by reason).

    Rows that failed are left black; use the mask to drop them.
    """
    out = torch.zeros((len(paths), 3, size, size), dtype=torch.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    failures: Counter = Counter()
    loader = decode_loader(paths, size, num_workers=num_workers, cache_dir=cache_dir, interpolation=interpolation)
    with progress_bar(total=len(paths), unit="img", desc="decode", show=progress) as bar:
        for batch in loader:
            for i, tensor, reason in batch:
                if tensor is None:
                    failures[reason] += 1
                    # The first few by name (a summary with counts follows), the rest only with -v.
                    shown = sum(failures.values()) <= NAMED_FAILURES
                    (logger.warning if shown else logger.debug)(f"{paths[i]}: {reason}; skipped")
                else:
                    out[i] = tensor
                    ok[i] = True
            bar.update(len(batch))
    return out, ok, failures


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)
