"""`museum dedup` on small real slices: injected exact and altered copies are grouped (the crop hash
confirming a cropped copy), text duplicates with conflicting labels are flagged, `--keep one` leaves
the input untouched, splits keep groups whole, the blockwise search equals the brute-force one, and
the page renders."""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from browser import open_in_chromium
from museum.cli import app
from museum.data.images import safe_open_image
from museum.data.competition import leak_free_split, split_leaks, text_groups
from museum.dedup import run_dedup
from museum.image.duplicates import file_hash, join_groups, similar_pairs


def _rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def folder_with_copies(tmp_path_factory, characters_dir) -> tuple[Path, dict[str, str]]:
    """12 real images of each of two classes; 2 byte-for-byte copies and 2 re-encoded, resized, cropped ones."""
    root = tmp_path_factory.mktemp("dups") / "simpsons"
    copies = {}
    for name in ("bart", "homer"):
        (root / name).mkdir(parents=True)
        for f in sorted((characters_dir / "simpsons_small" / name).glob("*.jpg"))[:12]:
            shutil.copy(f, root / name / f.name)
    for k, f in enumerate(sorted((root / "bart").glob("*.jpg"))[:4]):
        dst = root / "bart" / f"copy_{f.stem}.jpg"
        if k < 2:
            shutil.copy(f, dst)
        else:
            img = safe_open_image(f)
            w, h = img.size
            img = img.crop((w // 40, h // 40, w - w // 40, h - h // 40)).resize((int(w * 0.8), int(h * 0.8)), Image.BILINEAR)
            img.save(dst, format="JPEG", quality=80)
        copies[f"bart/{dst.name}"] = f"bart/{f.name}"
    return root, copies


def test_injected_copies_are_grouped_and_keep_one(tmp_path, folder_with_copies):
    root, copies = folder_with_copies
    before = {p: p.read_bytes() for p in root.rglob("*.jpg")}
    result = run_dedup(root, out=tmp_path / "out", keep="one", device="cpu")
    rows = _rows(tmp_path / "out" / "groups.csv")
    members = [{r["id"] for r in rows if r["group"] == str(g["group"])} for g in result.groups]
    for copy, original in copies.items():
        assert any({copy, original} <= m for m in members), (copy, original, members)
    kinds = {g["kind"] for g in result.groups}
    assert "exact" in kinds and "near" in kinds
    kept = _rows(result.kept)
    assert len(kept) == len(before) - sum(len(g["members"]) - 1 for g in result.groups)
    assert {p: p.read_bytes() for p in root.rglob("*.jpg")} == before  # nothing moved or rewritten
    groups_csv = _rows(tmp_path / "out" / "groups.csv")
    assert {r["kind"] for r in groups_csv} == kinds
    # A second run reuses the cached embeddings and finds the same groups.
    again = run_dedup(root, out=tmp_path / "out", device="cpu")
    assert [g["members"] for g in again.groups] == [g["members"] for g in result.groups]
    check = open_in_chromium(result.page, tmp_path / "dedup.png")
    assert len(check.images) == sum(len(g["members"]) for g in result.groups) and not check.broken_images


def test_text_duplicates_flag_conflicts_and_keep_one_csv(tmp_path, museum_train_csv):
    rows = _rows(museum_train_csv)[:200]
    rows.append({**rows[3], "guid": "dup-same"})
    rows.append({**rows[5], "guid": "dup-other", "description": "  " + rows[5]["description"].upper() + " ",
                 "typology": "оружие" if rows[5]["typology"] != "оружие" else "документы"})
    source = tmp_path / "train.csv"
    with open(source, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["guid", "description", "typology"])
        writer.writeheader()
        writer.writerows(rows)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    result = CliRunner().invoke(app, ["dedup", str(source), "--keep", "one", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "with conflicting labels" in result.output
    groups = _rows(tmp_path / "out" / "groups.csv")
    by_guid = {r["id"]: r for r in groups}
    assert by_guid["dup-other"]["conflicting"] == "1" and by_guid["dup-same"]["kind"] == "text"
    kept = _rows(tmp_path / "out" / "train.dedup.csv")
    assert "dup-same" not in {r["guid"] for r in kept} and rows[3]["guid"] in {r["guid"] for r in kept}
    assert hashlib.sha256(source.read_bytes()).hexdigest() == digest


def test_blockwise_pairs_equal_brute_force():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    x[150:160] = x[:10] + 0.05 * rng.normal(size=(10, 16))  # ten planted near copies
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ok = np.ones(300, dtype=bool)
    ok[7] = False  # an unreadable image takes part in nothing
    full = x @ x.T
    brute = {(i, j) for i in range(300) for j in range(i + 1, 300) if ok[i] and ok[j] and full[i, j] >= 0.9}
    found = {(i, j) for i, j, _ in similar_pairs(x, ok, 0.9, block=32)}
    assert found == brute and len(found) >= 9


def _union_find_groups(hashes: list, pairs: list) -> list[dict]:
    """The union-find museum.image.duplicates used before scipy's connected components (the reference)."""
    parent = list(range(len(hashes)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i, j):
        a, b = find(i), find(j)
        parent[max(a, b)] = min(a, b)

    first = {}
    for i, h in enumerate(hashes):
        if h is not None:
            union(first.setdefault(h, i), i)
    for i, j, _ in pairs:
        union(i, j)
    components, lowest = {}, {}
    for i in range(len(hashes)):
        components.setdefault(find(i), []).append(i)
    for i, j, s in pairs:
        lowest[find(i)] = min(lowest.get(find(i), 1.0), s)
    return [{"kind": "exact" if len({hashes[i] for i in m}) == 1 else "near", "members": m,
             "similarity": 1.0 if len({hashes[i] for i in m}) == 1 else lowest.get(root, 1.0)}
            for root, m in components.items() if len(m) > 1]


def test_groups_are_what_union_find_gave(folder_with_copies):
    """Real file hashes (byte copies among them, an unreadable row) and near pairs planted in chains
    (a copy of a copy), joined by connected components exactly as by the former union-find."""
    root, _ = folder_with_copies
    files = sorted(root.rglob("*.jpg")) * 3  # every file three times more: many exact groups
    hashes = [file_hash(p) for p in files] + [None]
    rng = np.random.default_rng(1)
    x = rng.normal(size=(len(hashes), 24)).astype(np.float32)
    for start in range(0, 60, 6):  # chains 0-1-2: 0 and 2 may be too far apart to pair directly
        x[start + 1] = x[start] + 0.3 * rng.normal(size=24)
        x[start + 2] = x[start + 1] + 0.3 * rng.normal(size=24)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    pairs = similar_pairs(x, np.ones(len(hashes), dtype=bool), 0.9)
    assert len(pairs) >= 10
    groups = join_groups(hashes, pairs)
    assert groups == _union_find_groups(hashes, pairs)
    assert {g["kind"] for g in groups} == {"exact", "near"}
    assert join_groups([], []) == [] and join_groups(["a", None, "a"], []) == [
        {"kind": "exact", "members": [0, 2], "similarity": 1.0}]


def test_splits_keep_groups_whole():
    labels = ["a"] * 50 + ["b"] * 50
    groups = [[0, 1, 2], [10, 60], [20, 21, 22, 23], [70, 71]]
    train, val = leak_free_split(labels, groups, 0.3, seed=0)
    assert not split_leaks(groups, train, val)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(100))
    assert split_leaks([[0, 1]], [0], [1]) == [[0, 1]]
    assert text_groups(["Монета", " монета ", "Картина"], ["x", "y", "z"]) == [
        {"kind": "text", "members": [0, 1], "similarity": 1.0, "conflicting": True}]


def test_bad_inputs_get_one_clear_line(tmp_path, museum_train_csv):
    runner = CliRunner()
    result = runner.invoke(app, ["dedup", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "not found" in result.output
    result = runner.invoke(app, ["dedup", str(museum_train_csv), "--threshold", "1.5"])
    assert result.exit_code == 2 and "--threshold 1.5" in result.output
    result = runner.invoke(app, ["dedup", str(museum_train_csv), "--images", str(tmp_path / "none")])
    assert result.exit_code == 2 and "not a folder" in result.output
    result = runner.invoke(app, ["dedup", str(museum_train_csv), "--keep", "two"])
    assert result.exit_code == 2 and "expected one of all, one" in result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["dedup", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "no images found" in result.output
    result = runner.invoke(app, ["dedup", str(museum_train_csv), "--images", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "none of its" in result.output and "has an image" in result.output


def test_dedup_and_clean_read_an_embed_file(tmp_path, characters_dir):
    """`museum embed` once; dedup (pooled) and clean (stages) read it, and refuse the other kind."""
    folder = tmp_path / "set"
    for cls in ("bart", "lisa"):
        (folder / cls).mkdir(parents=True)
        for src in sorted((characters_dir / "simpsons_small" / cls).iterdir())[:8]:
            shutil.copy(src, folder / cls / src.name)
    runner = CliRunner()
    for name, kind, backbone in (("pooled", "pooled", "mobilenet_v2"), ("stages", "stages", "tf_efficientnet_lite2"),
                                 ("pooled_lite2", "pooled", "tf_efficientnet_lite2")):
        result = runner.invoke(app, ["embed", str(folder), "--features", kind, "--backbone", backbone,
                                     "--out", str(tmp_path / f"{name}.npz")])
        assert result.exit_code == 0, result.output
    # dedup's thresholds were set on MobileNetV2's pooled features: another backbone's are refused in one line
    result = runner.invoke(app, ["dedup", str(folder), "--embeddings", str(tmp_path / "pooled_lite2.npz"), "--out", str(tmp_path / "d")])
    assert result.exit_code == 2 and "museum embed --backbone mobilenet_v2 --features pooled" in result.output
    result = runner.invoke(app, ["dedup", str(folder), "--embeddings", str(tmp_path / "pooled.npz"), "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "d" / "embeddings.npz").exists()  # nothing embedded again
    result = runner.invoke(app, ["dedup", str(folder), "--embeddings", str(tmp_path / "stages.npz"), "--out", str(tmp_path / "d")])
    assert result.exit_code == 2 and "holds stages features, this needs pooled" in result.output
    result = runner.invoke(app, ["clean", "--images", str(folder), "--folds", "2", "--embeddings", str(tmp_path / "stages.npz"),
                                 "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "c" / "embeddings.npz").exists()


def test_crop_hash_confirms_a_cropped_copy_the_embedding_is_unsure_of(characters_dir):
    """A 6 %-per-side crop hashes like its original at some crop ratio, an unrelated image does not; the
    hash admits a pair only above the cosine floor, so the rule is `cosine ≥ T or (cosine ≥ floor and hash close)`."""
    from museum.image.duplicates import crop_hashes, hash_distance

    a, b = sorted((characters_dir / "simpsons_small" / "bart").glob("*.jpg"))[:2]
    img = safe_open_image(a)
    w, h = img.size
    crop = img.crop((w * 6 // 100, h * 6 // 100, w - w * 6 // 100, h - h * 6 // 100)).resize((w * 3 // 4, h * 3 // 4))
    hashes = np.stack([crop_hashes(img), crop_hashes(crop), crop_hashes(safe_open_image(b))])
    near, far = hash_distance(hashes, np.array([0, 0]), np.array([1, 2]))
    assert near <= 0.15 < far
    feats = np.array([[1.0, 0.0], [0.8, 0.6], [0.8, 0.6]], dtype=np.float32)  # cosine 0.8 to row 0
    ok = np.ones(3, dtype=bool)
    found = {(i, j) for i, j, _ in similar_pairs(feats, ok, 0.96, hashes=hashes, hash_ok=ok)}
    assert (0, 1) in found and (0, 2) not in found
    below_floor = similar_pairs(feats, ok, 0.96, hashes=hashes, hash_ok=ok, floor=0.9)
    assert {(i, j) for i, j, _ in below_floor} == {(1, 2)}  # only the identical embeddings


def test_train_image_dedup_split_keeps_copies_on_one_side(characters_dir, tmp_path):
    """`train-image --dedup-split`: exact copies never straddle the train/validation split."""
    from museum.config import ImageConfig
    from museum.image.duplicates import image_groups
    from museum.image.validation import split_train_val

    paths, labels = [], []
    for name in ("bart", "homer"):
        (tmp_path / name).mkdir()
        for i, src in enumerate(sorted((characters_dir / "simpsons_small" / name).iterdir())[:8]):
            dst = tmp_path / name / f"{i}{src.suffix}"
            shutil.copy(src, dst)
            paths.append(dst)
            labels.append(name)
            if i < 4:  # a renamed copy: a leak waiting to happen
                copy = tmp_path / name / f"{i}_copy{src.suffix}"
                shutil.copy(src, copy)
                paths.append(copy)
                labels.append(name)
    config = ImageConfig(dedup_split=True, val_fraction=0.4, seed=3, input_size=64)
    train_p, _, val_p, _ = split_train_val(paths, labels, config)
    assert len(train_p) + len(val_p) == len(paths) and val_p
    index = {p: i for i, p in enumerate(paths)}
    groups = image_groups(paths, device="cpu")
    assert len(groups) >= 8
    assert not split_leaks(groups, [index[p] for p in train_p], [index[p] for p in val_p])
