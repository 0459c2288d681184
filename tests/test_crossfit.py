"""Training records (`museum.provenance`), cross-fitted out-of-fold probabilities (`museum.crossfit`)."""

from __future__ import annotations

import pytest

from museum.errors import MuseumError
from museum.provenance import check_training_record, save_training_record, training_record


def _csv(path, rows):
    path.write_text("guid,description,typology\n" + "".join(f"{g},{d},{t}\n" for g, d, t in rows), encoding="utf-8")
    return path


def test_training_record_round_trip_and_refusals(tmp_path):
    train = _csv(tmp_path / "train.csv", [("a", "ваза", "x"), ("b", "монета", "y")])
    extra = _csv(tmp_path / "extra.csv", [("c", "картина", "")])
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"12345")
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(MuseumError, match="no data.json.*retrain"):
        check_training_record(model)
    record = training_record(train, images=images, unlabeled=[extra])
    assert record["train"]["path"] == str(train.resolve()) and len(record["train"]["sha256"]) == 64
    assert record["images"] == {"path": str(images.resolve()), "files": 1, "bytes": 5}
    save_training_record(model, record)
    assert check_training_record(model) == record
    extra.write_text(extra.read_text(encoding="utf-8") + "d,скульптура,\n", encoding="utf-8")
    with pytest.raises(MuseumError, match=r"extra\.csv: changed since.*restore that version or retrain"):
        check_training_record(model)
    save_training_record(model, training_record(train, images=images, unlabeled=[extra]))
    train.unlink()
    with pytest.raises(MuseumError, match=r"train\.csv: recorded in .*data\.json as training data but gone"):
        check_training_record(model)


# ----------------------------------------------------------------------------- folds

import csv  # noqa: E402
from collections import Counter  # noqa: E402

import numpy as np  # noqa: E402

from museum.config import FusionConfig, ImageConfig, TextConfig  # noqa: E402
from museum.crossfit import _ExpertData, cross_fit, crossfit_folds, load_oof  # noqa: E402
from museum.data.competition import normalise_description, read_competition_csv  # noqa: E402


def test_folds_keep_descriptions_together_stratified_and_seeded(multimodal_dir):
    table = read_competition_csv(multimodal_dir / "train.csv", require_labels=True)
    fold = crossfit_folds(table.labels, table.descriptions, 5, seed=0)
    folds_of: dict[str, set] = {}
    for d, f in zip(table.descriptions, fold):
        if normalise_description(d):
            folds_of.setdefault(normalise_description(d), set()).add(int(f))
    assert all(len(f) == 1 for f in folds_of.values())  # no description on both sides of any fold
    assert sum(v > 1 for v in Counter(normalise_description(d) for d in table.descriptions if d).values()) > 50
    sizes = np.bincount(fold)
    assert len(sizes) == 5 and sizes.min() > 0.6 * sizes.max()
    for label in ("живопись", "предметы нумизматики"):  # the large classes spread over every fold
        per_fold = np.bincount(fold[np.array(table.labels) == label], minlength=5)
        assert per_fold.min() > 0.4 * per_fold.max()
    assert (crossfit_folds(table.labels, table.descriptions, 5, seed=0) == fold).all()
    assert (crossfit_folds(table.labels, table.descriptions, 5, seed=1) != fold).any()
    # Extra groups (e.g. near-duplicate photos) are kept together too.
    linked = crossfit_folds(table.labels, table.descriptions, 5, seed=0, extra_groups=[[0, 1, 2, 3]])
    assert len(set(linked[[0, 1, 2, 3]].tolist())) == 1
    with pytest.raises(MuseumError, match="too few for 5 folds"):
        crossfit_folds(["a", "b", "a"], ["x", "x", "y"], 5)


def test_training_rows_left_out_by_guid_description_or_image_bytes():
    data = _ExpertData("image", None, None, ["a"] * 4, [None] * 4, ["g1", "g2", "g3", None],
                       ["ваза", "", "монета", ""], ["h1", "h2", "h3", "h4"])
    assert data.left_out({"g2"}, {"монета"}, {"h4"}).tolist() == [False, True, True, True]
    assert not data.left_out(set(), {""} - {""}, set()).any()


# ----------------------------------------------------------------------------- end to end on a small real slice

TINY_TEXT = dict(epochs=1, w2v_epochs=1, w2v_dim=16, navec=False, vectors_weight=0.0, hidden=8, device="cpu")
TINY_IMAGE = dict(backbone="mobilenet_v3_small", epochs=1, members=1, input_size=64, weights="none", device="cpu", workers=1, tta=False, ema=0.0)


def _write(path, table, rows):
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["guid", "description", "typology"])
        writer.writerows([table.guids[i], table.descriptions[i], table.labels[i]] for i in rows)
    return path


@pytest.fixture(scope="module")
def small_world(tmp_path_factory, multimodal_dir, museum_train_csv):
    """60 labelled multimodal rows; a text expert trained on museum/train.csv rows that include their
    descriptions; an image expert trained on those 60 photos and 40 others. Both folders with data.json."""
    from museum.image.train import fit_image_model
    from museum.text.model import TextModel
    from museum.utils import write_json

    root = tmp_path_factory.mktemp("crossfit")
    mm = read_competition_csv(multimodal_dir / "train.csv", require_labels=True)
    labelled = _write(root / "labelled.csv", mm, range(60))
    image_csv = _write(root / "image_train.csv", mm, range(100))
    texts = read_competition_csv(museum_train_csv, require_labels=True)
    wanted = {normalise_description(d) for d in mm.descriptions[:60]} - {""}
    rows = [i for i, d in enumerate(texts.descriptions) if normalise_description(d) in wanted]
    text_csv = _write(root / "text_train.csv", texts, sorted(set(rows) | set(range(150))))
    models = root / "models"
    text_table = read_competition_csv(text_csv, require_labels=True)
    TextModel(TextConfig(**TINY_TEXT)).fit(text_table.descriptions, text_table.labels, text_table.descriptions[:30],
                                           text_table.labels[:30], progress=False).save(models / "text")
    save_training_record(models / "text", training_record(text_csv))
    from museum.data.images import list_competition_images

    items = list_competition_images(image_csv, multimodal_dir / "images")
    config = ImageConfig(**TINY_IMAGE)
    fit_image_model(config, items.paths, items.labels, out=models / "image")
    from museum.config import config_to_dict

    write_json(models / "image" / "config.json", config_to_dict(config))
    save_training_record(models / "image", training_record(image_csv, images=multimodal_dir / "images"))
    return {"labelled": labelled, "images": multimodal_dir / "images", "text": models / "text",
            "image": models / "image", "text_csv": text_csv, "n_text_overlap": len(rows)}


def test_cross_fit_end_to_end_and_reuse(small_world, monkeypatch):
    import museum.crossfit as crossfit

    w = small_world
    oof = cross_fit(w["labelled"], w["images"], w["text"], w["image"], n_folds=2, seed=0)
    table = read_competition_csv(w["labelled"], require_labels=True)
    assert oof.guids == table.guids and oof.path.is_file() and oof.path.parent == w["text"].parent / "crossfit"
    assert oof.has_text.tolist() == table.has_text.tolist()  # every description scored, empty ones not
    assert oof.has_image.sum() >= 55  # a few multimodal photos are broken or zero-byte
    for p, ok in ((oof.text_p, oof.has_text), (oof.image_p, oof.has_image)):
        np.testing.assert_allclose(p[ok].sum(1), 1.0, atol=1e-4)
        assert np.isnan(p[~ok]).all()
    # Every fold's retrained experts left out the fold's rows: the text expert each row whose description
    # is in the fold (each such row once over the folds, as descriptions never straddle them), the image
    # expert (trained on the labelled photos themselves) at least each fold row it scored.
    text_left = [t["left_out"] for t in oof.timings["text"]]
    image_left = [t["left_out"] for t in oof.timings["image"]]
    assert sum(text_left) == w["n_text_overlap"] and all(t["how"] == "retrained" for t in oof.timings["text"])
    assert all(n >= oof.has_image[oof.fold == f].sum() for f, n in enumerate(image_left))
    assert oof.summary().startswith("cross-fit: 60 labelled rows, 2 folds")
    choice = oof.choose(FusionConfig(), fallback="живопись")
    assert choice.rows == 60 and set(choice.estimates) == {"default", "cascade", "weighted", "stacker"}
    from museum.fusion import load_settings, rule_from_settings, save_fusion

    settings = w["text"].parent / "fusion.json"
    save_fusion(settings, choice, FusionConfig(fallback="живопись"), cross_fit=str(oof.path))
    config, saved = load_settings(settings)
    rule = rule_from_settings(saved, oof.classes, config)  # what submit / evaluate / serve will do
    args = (oof.text_p, oof.image_p, oof.has_text, oof.has_image)
    assert rule.combine(*args).pred.tolist() == choice.rule.combine(*args).pred.tolist()

    # A rerun trains nothing: the whole result, or each fold's file when the whole one is gone.
    def no_training(*args):
        raise AssertionError("trained again")

    monkeypatch.setattr(crossfit, "_fit_text", no_training)
    monkeypatch.setattr(crossfit, "_fit_image", no_training)
    again = cross_fit(w["labelled"], w["images"], w["text"], w["image"], n_folds=2, seed=0)
    assert again.reused and np.array_equal(again.text_p, oof.text_p, equal_nan=True)
    oof.path.unlink()
    resumed = cross_fit(w["labelled"], w["images"], w["text"], w["image"], n_folds=2, seed=0)
    assert not resumed.reused and np.array_equal(resumed.image_p, oof.image_p, equal_nan=True)
    assert load_oof(resumed.path).classes == oof.classes
    # Another seed is another set of folds: it would train.
    with pytest.raises(AssertionError, match="trained again"):
        cross_fit(w["labelled"], w["images"], w["text"], w["image"], n_folds=2, seed=1)


def test_cross_fit_refuses_changed_training_data(small_world, tmp_path):
    import shutil

    w = small_world
    text = tmp_path / "text"
    shutil.copytree(w["text"], text)
    (text / "data.json").unlink()
    with pytest.raises(MuseumError, match="no data.json.*retrain"):
        cross_fit(w["labelled"], w["images"], text, None, n_folds=2)
    csv_copy = tmp_path / "text_train.csv"
    shutil.copy(w["text_csv"], csv_copy)
    save_training_record(text, training_record(csv_copy))
    csv_copy.write_text(csv_copy.read_text(encoding="utf-8") + "zz,новая строка,графика\n", encoding="utf-8")
    with pytest.raises(MuseumError, match="text_train.csv: changed since"):
        cross_fit(w["labelled"], w["images"], text, None, n_folds=2)
