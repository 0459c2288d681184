"""The text expert on a small real slice: save/load, determinism, CLI smoke."""

from __future__ import annotations


import numpy as np
import pytest
from typer.testing import CliRunner

from museum.cli import app
from museum.config import TextConfig
from museum.data.competition import read_competition_csv, stratified_split
from museum.text.model import TextModel

FAST = TextConfig(epochs=3, patience=2, hidden=32, w2v_epochs=2, seed=3)


@pytest.fixture(scope="module")
def slice_table(museum_train_csv):
    table = read_competition_csv(museum_train_csv, require_labels=True)
    keep, _ = stratified_split(table.labels, 0.85, seed=0)  # ~570 rows, every class present
    return table.subset(keep)


@pytest.fixture(scope="module")
def split(slice_table):
    tr, va = stratified_split(slice_table.labels, 0.25, seed=0)
    return slice_table.subset(tr), slice_table.subset(va)


@pytest.fixture(scope="module")
def fitted(split):
    train, val = split
    return TextModel(FAST).fit(train.descriptions, train.labels, val.descriptions, val.labels, progress=False)


def test_probabilities_follow_classes(fitted, split):
    _, val = split
    proba = fitted.predict_proba(val.descriptions)
    assert proba.shape == (len(val), len(fitted.classes_))
    assert np.allclose(proba.sum(1), 1, atol=1e-4)
    assert fitted.classes_ == sorted(fitted.classes_)
    assert set(fitted.blend_weights_) == {"lstm", "tfidf", "vectors"}  # navec ships with the dev install
    assert abs(sum(fitted.blend_weights_.values()) - 1.0) < 1e-9
    accuracy = np.mean(np.array(fitted.predict(val.descriptions)) == np.array(val.labels))
    assert accuracy > 0.5  # far above the ~16% of always predicting the largest class


def test_save_load_identical_probabilities(fitted, split, tmp_path):
    _, val = split
    fitted.save(tmp_path / "m")
    loaded = TextModel.load(tmp_path / "m")
    assert loaded.classes_ == fitted.classes_
    assert np.array_equal(loaded.predict_proba(val.descriptions), fitted.predict_proba(val.descriptions))
    assert loaded.predict_proba([]).shape == (0, len(fitted.classes_))


def test_same_seed_same_predictions(fitted, split):
    train, val = split
    again = TextModel(FAST).fit(train.descriptions, train.labels, val.descriptions, val.labels, progress=False)
    assert np.array_equal(again.predict_proba(val.descriptions), fitted.predict_proba(val.descriptions))


def test_load_rejects_non_model_folder(tmp_path):
    from museum.errors import MuseumError

    with pytest.raises(MuseumError, match="not a text model folder"):
        TextModel.load(tmp_path)
    (tmp_path / "text_model.pt").write_bytes(b"garbage")
    with pytest.raises(MuseumError, match="cannot load the text model"):
        TextModel.load(tmp_path)


def test_cli_train_and_predict(slice_table, tmp_path):
    csv_path = tmp_path / "slice.csv"
    import csv

    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["guid", "description", "typology"])
        writer.writerows(zip(slice_table.guids, slice_table.descriptions, slice_table.labels))
    out = tmp_path / "model"
    runner = CliRunner()
    result = runner.invoke(app, ["train-text", "--train", str(csv_path), "--out", str(out), "--epochs", "2",
                                 "--hidden", "32", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "val macro-F1" in result.output
    for name in ("text_model.pt", "vocab.json", "word_vectors.npy", "tfidf.npz", "vectors.npz", "config.json", "metrics.json",
                 "summary.csv"):
        assert (out / name).exists(), name
    result = runner.invoke(app, ["predict-text", "Монета. Две копейки. 1789 г.", "--model", str(out)])
    assert result.exit_code == 0, result.output
    assert "предметы нумизматики" in result.output.splitlines()[1]


@pytest.mark.parametrize("content, message", [
    ("guid,description\na,b\n", "missing column typology"),
    ("guid,description,typology\na,Монета,x\nb,Монета медная,x\nc,,y\n", "rows with a description have only 'x'"),
    ("guid,description,typology\na,Монета,x\nb,Картина,y\n", "no row left for validation"),
])
def test_cli_bad_input_is_one_line(tmp_path, content, message):
    bad = tmp_path / "bad.csv"
    bad.write_text(content, encoding="utf-8")
    result = CliRunner().invoke(app, ["train-text", "--train", str(bad), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("error:") and message in result.output
    assert "Traceback" not in result.output


def test_word_vector_expert_reaches_words_unseen_in_training(tmp_path):
    """Words absent from every training row still vote through their pretrained neighbours."""
    from museum.text.vector_expert import WordVectorExpert

    rng = np.random.default_rng(0)
    minerals, coins = rng.normal(size=300), rng.normal(size=300)
    words = [f"m{i}" for i in range(12)] + [f"c{i}" for i in range(12)]
    table = np.stack([minerals + 0.3 * rng.normal(size=300) for _ in range(12)]
                     + [coins + 0.3 * rng.normal(size=300) for _ in range(12)]).astype(np.float32)
    # Train on the first eight words of each cluster; the last four never occur in a training row.
    tokens = [[f"m{i}", f"m{(i + 1) % 8}"] for i in range(8)] + [[f"c{i}", f"c{(i + 1) % 8}"] for i in range(8)]
    labels = ["минералы"] * 8 + ["монеты"] * 8
    expert = WordVectorExpert(c=1.0).fit(tokens, labels, words, table)
    unseen = [["m10"], ["c11"], ["m9", "m11"]]
    assert [expert.classes_[i] for i in expert.predict_proba(unseen).argmax(1)] == ["минералы", "монеты", "минералы"]
    meta, arrays = expert.to_state()
    loaded = WordVectorExpert.from_state(meta, arrays)
    assert np.array_equal(loaded.predict_proba(unseen), expert.predict_proba(unseen))
    assert np.allclose(expert.predict_proba([["unknown"]]).sum(), 1.0)  # no known word: the prior, not a crash


def test_cli_bad_weights_are_one_line(museum_train_csv, tmp_path):
    for args, message in [(["--vectors-weight", "2"], "--vectors-weight 2.0: must be between 0 and 1"),
                          (["--blend-weight", "much"], "--blend-weight much: expected a number"),
                          (["--blend-weight", "0.9", "--vectors-weight", "0.5"], "leaves TF-IDF nothing")]:
        result = CliRunner().invoke(app, ["train-text", "--train", str(museum_train_csv), "--out", str(tmp_path / "m"), *args])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m").exists()  # refused before anything was written


def test_char_wb_transformer_matches_scikit_learn(museum_train_csv):
    """The word-cached char_wb transform gives scikit-learn's matrix exactly, cold and warm."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    from museum.text.charwb import CharWbTransformer
    from museum.text.tokenize import normalise

    texts = [normalise(t) for t in read_competition_csv(museum_train_csv, require_labels=True).descriptions]
    odd = ["", "   ", "a", "Ab", "Ёлка  ПАЛКА\tx\xa0y", "№ 5 г.", "x" * 10, "a\u2003b"]
    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, dtype=np.float32)
    vectorizer.fit(texts[:2000])
    fast = CharWbTransformer(vectorizer)
    for batch in (texts[2000:] + odd, texts[2000:] + odd):  # the second pass is answered from the word cache
        expected, got = vectorizer.transform(batch), fast.transform(batch)
        assert got.dtype == expected.dtype and (got != expected).nnz == 0
