"""Safe image decoding and the two dataset layouts, on generated bad files and real images."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from museum.data import images as im
from museum.data.images import (ImageDecodeError, decode_cache, list_competition_images, list_image_folder,
                                safe_open_image)
from museum.errors import MuseumError


def _jpeg(path: Path, size=(40, 30), color=(200, 30, 30), mode="RGB", **save) -> Path:
    Image.new(mode, size, color).save(path, "JPEG", **save)
    return path


@pytest.fixture()
def bad_files(tmp_path: Path) -> dict[str, Path]:
    good = _jpeg(tmp_path / "good.jpg")
    zero = tmp_path / "zero.jpg"
    zero.write_bytes(b"")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    text = tmp_path / "text.jpg"
    text.write_text("this is not a picture\n" * 20)
    huge = tmp_path / "huge.png"
    Image.new("1", (9000, 9000)).save(huge)  # 81 megapixels, a few KB on disk
    return {"good": good, "zero": zero, "truncated": truncated, "text": text, "huge": huge,
            "missing": tmp_path / "missing.jpg"}


@pytest.mark.parametrize("kind,reason", [
    ("missing", "missing"), ("zero", "zero-byte file"), ("truncated", "truncated or corrupt"),
    ("text", "not an image"), ("huge", "absurd size"),
])
def test_bad_files_raise_one_reason(bad_files, kind, reason):
    with pytest.raises(ImageDecodeError) as info:
        safe_open_image(bad_files[kind])
    assert info.value.reason == reason
    assert isinstance(info.value, MuseumError) and "\n" not in str(info.value)


def test_pillow_bomb_limit_is_refused(bad_files, monkeypatch):
    # Pillow's own guard (a warning up to 2x MAX_IMAGE_PIXELS) must become a refusal, not a decode.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageDecodeError, match="absurd size"):
        safe_open_image(bad_files["good"])  # 1200 pixels: between 1x and 2x the limit


def test_modes_come_out_rgb(tmp_path):
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(cmyk, "JPEG", quality=95)  # pure red in CMYK
    img = safe_open_image(cmyk)
    r, g, b = np.asarray(img).reshape(-1, 3).mean(0)
    assert img.mode == "RGB" and r > 200 and g < 60 and b < 60

    pal = tmp_path / "pal.png"
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 255] + [0] * 765)
    p.info["transparency"] = 0
    p.save(pal, transparency=0)
    assert np.asarray(safe_open_image(pal)).min() == 255  # fully transparent → white background

    la = tmp_path / "la.png"
    Image.new("LA", (8, 8), (0, 255)).save(la)
    assert safe_open_image(la).getpixel((0, 0)) == (0, 0, 0)

    grey16 = tmp_path / "grey16.png"
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(grey16)
    assert safe_open_image(grey16).getpixel((0, 0)) == (255, 255, 255)

    bmp = tmp_path / "grey.bmp"
    Image.new("L", (8, 8), 128).save(bmp)
    assert safe_open_image(bmp).getpixel((0, 0)) == (128, 128, 128)


def test_exif_rotation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.new("RGB", (40, 20), (0, 128, 0)).save(path, "JPEG", exif=exif.tobytes())
    assert safe_open_image(path).size == (20, 40)


def test_decode_cache_skips_and_counts(bad_files):
    paths = list(bad_files.values()) + [None]
    cache, ok, failures = decode_cache(paths, 24, num_workers=0)
    assert cache.shape == (len(paths), 3, 24, 24) and cache.dtype.is_floating_point is False
    assert ok.tolist() == [True] + [False] * (len(paths) - 1)
    assert failures == {"zero-byte file": 1, "truncated or corrupt": 1, "not an image": 1,
                        "absurd size": 1, "missing": 2}
    assert cache[0, 0].float().mean() > 150  # red channel of the red image


def test_disk_cache_is_reused(tmp_path, bad_files):
    first, ok1, _ = decode_cache([bad_files["good"]], 16, num_workers=0, cache_dir=tmp_path / "cache")
    files = list((tmp_path / "cache").rglob("*.npy"))
    assert len(files) == 1 and files[0].name.endswith("_16.npy")
    second, ok2, _ = decode_cache([bad_files["good"]], 16, num_workers=0, cache_dir=tmp_path / "cache")
    assert ok1.all() and ok2.all() and (first == second).all()


def test_disk_cache_keys_on_the_interpolation(tmp_path, characters_dir):
    """A backbone's bicubic decoding is cached apart from bilinear (older cache entries keep their names)."""
    photo = sorted((characters_dir / "simpsons_small" / "bart").iterdir())[0]
    cache = tmp_path / "cache"
    bilinear, _, _ = decode_cache([photo], 24, num_workers=0, cache_dir=cache)
    bicubic, ok, _ = decode_cache([photo], 24, num_workers=0, cache_dir=cache, interpolation="bicubic")
    names = sorted(p.name for p in cache.rglob("*.npy"))
    assert ok.all() and len(names) == 2 and names[0].endswith("_24.npy") and names[1].endswith("_24_bicubic.npy")
    assert not (bilinear == bicubic).all()
    assert (bicubic[0] == im.image_to_tensor(safe_open_image(photo, draft=24), 24, "bicubic")).all()
    again, _, _ = decode_cache([photo], 24, num_workers=0, cache_dir=cache, interpolation="bicubic")
    assert (again == bicubic).all()
    with pytest.raises(MuseumError, match="interpolation 'cubic'"):
        decode_cache([photo], 24, num_workers=0, interpolation="cubic")


def test_folder_layout(characters_dir):
    items = list_image_folder(characters_dir / "simpsons_small")
    assert sorted(set(items.labels)) == ["bart", "homer", "lisa", "maggie", "marge"]
    assert len(items) == 324
    assert {p.suffix.lower() for p in items.paths} <= set(im.IMAGE_SUFFIXES)
    cache, ok, failures = decode_cache(items.paths[:8], 32, num_workers=2)
    assert ok.all() and not failures and cache.float().std() > 10


def test_folder_layout_errors(tmp_path):
    with pytest.raises(MuseumError, match="not a folder"):
        list_image_folder(tmp_path / "nope")
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "readme.txt").write_text("x")
    with pytest.raises(MuseumError, match="no images found"):
        list_image_folder(tmp_path)


def test_competition_layout(tmp_path, multimodal_dir):
    rows = list(csv.DictReader(open(multimodal_dir / "train.csv", encoding="utf-8")))[:6]
    images = tmp_path / "images"
    images.mkdir()
    for row in rows[:4]:
        shutil.copy(multimodal_dir / "images" / f"{row['guid']}.jpg", images)
    # The set's first three images are really broken (2 zero-byte, 1 cut short), like the competition's.
    (images / f"{rows[4]['guid']}.jpg").write_bytes(b"")
    # rows[5] has no image; one more row has a guid that would escape the folder
    table = tmp_path / "train.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["guid", "description", "typology"])
        writer.writeheader()
        writer.writerows(rows + [{"guid": "../etc/passwd", "description": "x", "typology": rows[0]["typology"]}])
    items = list_competition_images(table, images)
    assert len(items) == 5 and items.skipped == {"missing": 1, "unsafe guid": 1}
    assert all(p.parent == images for p in items.paths)
    _, ok, failures = decode_cache(items.paths, 32, num_workers=0)
    assert ok.tolist() == [False, False, False, True, False]
    assert failures == {"zero-byte file": 3, "truncated or corrupt": 1}


def test_real_bad_images_of_the_multimodal_set(multimodal_dir):
    # The shared set, like the competition's, has zero-byte and cut-short images: none may crash.
    paths = sorted((multimodal_dir / "images").glob("*.jpg"))
    small = [p for p in paths if p.stat().st_size < 2000][:10]
    for path in small:
        try:
            assert safe_open_image(path).mode == "RGB"
        except ImageDecodeError as exc:
            assert exc.reason in {"zero-byte file", "truncated or corrupt", "not an image"}


def test_draft_decoding_keeps_size_sane(tmp_path):
    path = _jpeg(tmp_path / "big.jpg", size=(800, 600))
    img = im.decode_bytes(path.read_bytes(), path, draft=100)
    assert min(img.size) >= 100 and img.size[0] < 800  # shrunk by the JPEG decoder itself


def test_image_to_tensor_shape():
    t = im.image_to_tensor(Image.new("RGB", (50, 20), (1, 2, 3)), 16)
    assert t.shape == (3, 16, 16) and t[:, 0, 0].tolist() == [1, 2, 3]
