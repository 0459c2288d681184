"""`museum eda` on real data: an image folder with broken files, CSVs with conflicting
duplicates, channel statistics, and the page in Chromium."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from browser import open_in_chromium
from museum.cli import app
from museum.data.competition import conflicting_descriptions, read_competition_csv
from museum.data.images import list_image_folder
from museum.reports.eda import STATS_FORMAT, STATS_SIZE, run_eda


@pytest.fixture()
def broken_folder(tmp_path, characters_dir) -> Path:
    """Four real images of each of two classes, plus a truncated JPEG, a non-image and an empty file."""
    root = tmp_path / "images"
    source = characters_dir / "simpsons_small"
    for name in ("bart", "lisa"):
        (root / name).mkdir(parents=True)
        for path in sorted((source / name).glob("*.jpg"))[:4]:
            shutil.copy(path, root / name / path.name)
    real = sorted((source / "bart").glob("*.jpg"))[0].read_bytes()
    (root / "bart" / "cut.jpg").write_bytes(real[: len(real) // 3])
    (root / "lisa" / "notes.jpg").write_text("not a picture", encoding="utf-8")
    (root / "lisa" / "empty.png").write_bytes(b"")
    return root


def test_eda_folder_with_broken_images(tmp_path, broken_folder):
    result = CliRunner().invoke(app, ["eda", str(broken_folder), "--out", str(tmp_path / "eda")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "eda" / "eda.json").read_text(encoding="utf-8"))
    assert summary["classes"] == {"bart": 5, "lisa": 6}
    images = summary["images"]
    assert images["readable"] == 8
    assert images["unreadable"] == {"truncated or corrupt": 1, "not an image": 1, "zero-byte file": 1}
    assert {Path(f["path"]).name for f in images["unreadable_files"]} == {"cut.jpg", "notes.jpg", "empty.png"}
    assert "cut.jpg (truncated or corrupt)" in result.output
    page = (tmp_path / "eda" / "eda.html").read_text(encoding="utf-8")
    assert "Unreadable files" in page and page.count("<img") == 2  # classes and sizes


def _rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_eda_csv_with_conflicting_duplicates(tmp_path, museum_train_csv):
    rows = _rows(museum_train_csv)[:300]
    # Two real descriptions repeated: one with its own label, one with another row's label.
    rows.append({**rows[0], "guid": "copy-same"})
    other = next(r["typology"] for r in rows if r["typology"] != rows[1]["typology"])
    rows.append({**rows[1], "guid": "copy-other", "typology": other})
    small = tmp_path / "small.csv"
    with open(small, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["guid", "description", "typology"])
        writer.writeheader()
        writer.writerows(rows)
    result = run_eda(small, out=tmp_path / "eda")
    d = result.summary["descriptions"]
    assert d["conflicting_groups"] >= 1
    assert any(g["description"] == rows[1]["description"].strip() and set(g["labels"]) == {rows[1]["typology"], other}
               for g in d["conflicting"])
    assert d["duplicate_groups"] >= 2
    assert "with conflicting labels" in result.text
    assert (tmp_path / "eda" / "text_lengths.png").stat().st_size > 10_000


def test_eda_on_train_csv_agrees_with_the_reader(tmp_path, museum_train_csv):
    result = run_eda(museum_train_csv, out=tmp_path / "eda")
    table = read_competition_csv(museum_train_csv, require_labels=True)
    n_conflicts, n_rows = conflicting_descriptions(table)
    d = result.summary["descriptions"]
    assert (d["conflicting_groups"], d["conflicting_rows"]) == (n_conflicts, n_rows)
    assert len(result.summary["classes"]) == 15
    assert result.summary["imbalance_ratio"] > 10
    check = open_in_chromium(result.page, tmp_path / "eda.png")
    assert len(check.images) == 2 and not check.broken_images, check.images


def test_eda_stats_match_an_in_memory_computation(tmp_path, characters_dir):
    folder = tmp_path / "mnist"
    items = list_image_folder(characters_dir / "simpsons_mnist")
    for path in items.paths[::100]:
        (folder / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.parent.name / path.name)
    result = CliRunner().invoke(app, ["eda", str(folder), "--stats", "--out", str(tmp_path / "eda")])
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "eda" / "channel_stats.json").read_text(encoding="utf-8"))
    assert stats["format"] == STATS_FORMAT and stats["images"] == 80
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB").resize((STATS_SIZE, STATS_SIZE), Image.BILINEAR),
                                  np.float64) / 255 for p in sorted(folder.rglob("*.*"))])
    assert stats["mean"] == pytest.approx(pixels.mean(axis=(0, 1, 2)), abs=1e-5)
    assert stats["std"] == pytest.approx(pixels.std(axis=(0, 1, 2)), abs=1e-5)


def test_eda_csv_with_image_folder(tmp_path, multimodal_dir):
    result = run_eda(multimodal_dir / "train.csv", images=multimodal_dir / "images", out=tmp_path / "eda")
    images = result.summary["images"]
    # The README: a few images of this set are zero-byte or cut short.
    assert images["readable"] > 700 and sum(images["unreadable"].values()) >= 1
    assert result.summary["descriptions"]["empty"] > 0


def test_eda_errors_are_one_line(tmp_path, museum_train_csv):
    runner = CliRunner()
    (tmp_path / "no_images").mkdir()
    for args, expected in (
        (["eda", str(tmp_path / "nope.csv")], "not found"),
        (["eda", str(museum_train_csv), "--stats"], "has no images"),
        (["eda", str(museum_train_csv), "--stats", "--images", str(tmp_path / "no_images"), "--out", str(tmp_path / "o")],
         "no readable image"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert expected in result.output and result.output.strip().count("\n") == 0
