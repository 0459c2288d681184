"""The competition CSV layer: reading, one-line validation errors, splits."""

from __future__ import annotations

import logging
from collections import Counter

import pytest

from museum.data.competition import (
    is_safe_id, iter_competition_chunks, read_competition_csv, stratified_folds, stratified_split,
)
from museum.errors import MuseumError


def write(tmp_path, text: str, name: str = "t.csv", encoding: str = "utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def test_reads_real_train(museum_train_csv):
    table = read_competition_csv(museum_train_csv, require_labels=True)
    assert len(table) == 3788
    assert len(set(table.labels)) == 15
    assert all(table.guids)


def test_reads_real_test_with_empty_descriptions(museum_test_csv):
    table = read_competition_csv(museum_test_csv)
    assert len(table) == 1223
    assert int((~table.has_text).sum()) == 547


def test_bom_multiline_extra_columns(tmp_path):
    path = write(tmp_path, '\ufeffguid,extra,description,typology\na1,x,"Монета.\nДве копейки",нумизматика\nb2,y,,\n')
    table = read_competition_csv(path)
    assert table.guids == ["a1", "b2"]
    assert table.descriptions == ["Монета.\nДве копейки", ""]
    assert table.has_text.tolist() == [True, False]


@pytest.mark.parametrize(
    "content, needle",
    [
        ("", "empty file"),
        ("guid,typology\na,b\n", "missing column(s) description"),
        ("guid,description,typology\na,x,y\na,z,y\n", "line 3, field guid: duplicated guid 'a' (first at line 2)"),
        ("guid,description,typology\na,x,y\nb,z,\n", "line 3, field typology: empty label"),
        ("guid,description,typology\n,x,y\n", "line 2, field guid: empty"),
        ("guid,description,typology\n", "header only"),
        # an unclosed quote must not swallow the rows after it
        ('guid,description,typology\na,x,y\nb,"open,y\nc,z,y\n', "line 3: not a readable CSV row"),
        # a row spanning lines is named by its first line
        ('guid,description,typology\na,"two\nlines",y\na,z,y\n', "line 4, field guid: duplicated guid 'a' (first at line 2)"),
    ],
)
def test_validation_errors_name_the_problem(tmp_path, content, needle):
    path = write(tmp_path, content)
    with pytest.raises(MuseumError) as info:
        read_competition_csv(path, require_labels=True)
    message = str(info.value)
    assert needle in message and str(path) in message and "\n" not in message


def test_missing_label_column_in_training_file(tmp_path):
    path = write(tmp_path, "guid,description\na,x\n")
    with pytest.raises(MuseumError, match="missing column typology"):
        read_competition_csv(path, require_labels=True)
    assert read_competition_csv(path).labels is None  # fine at predict time


def test_binary_and_non_utf8_files(tmp_path):
    with pytest.raises(MuseumError, match="not a CSV file"):
        read_competition_csv(write(tmp_path, "\x00\x01\x02PNG", "b.csv"))
    with pytest.raises(MuseumError, match="not UTF-8"):
        read_competition_csv(write(tmp_path, "guid,description\nа,б\n", "c.csv", encoding="cp1251"))
    with pytest.raises(MuseumError, match="file not found"):
        read_competition_csv(tmp_path / "nope.csv")


def test_conflicting_labels_warned_with_counts(tmp_path, caplog):
    path = write(tmp_path, "guid,description,typology\na,Открытка,x\nb,открытка ,y\nc,Монета,z\n")
    logger = logging.getLogger("museum")
    logger.addHandler(caplog.handler)
    try:
        read_competition_csv(path, require_labels=True)
    finally:
        logger.removeHandler(caplog.handler)
    assert "1 description(s) carry conflicting labels (2 rows)" in caplog.text


def test_chunks_detect_duplicates_across_chunks(tmp_path):
    path = write(tmp_path, "guid,description\na,1\nb,2\nc,3\na,4\n")
    chunks = iter_competition_chunks(path, chunk_size=2)
    assert len(next(chunks)) == 2
    with pytest.raises(MuseumError, match="duplicated guid 'a'"):
        list(chunks)


def test_safe_ids():
    assert is_safe_id("442460c1-2c09-4b58-acb3-cddcbf650598")
    for bad in ("../etc/passwd", "a/b", ".hidden", "", "a..b", "a\\b", "a b"):
        assert not is_safe_id(bad)


def test_stratified_split_keeps_rare_classes_and_is_seeded():
    labels = ["a"] * 50 + ["b"] * 10 + ["c"] * 2 + ["d"]
    train, val = stratified_split(labels, 0.2, seed=1)
    assert sorted(train.tolist() + val.tolist()) == list(range(len(labels)))
    train_counts = Counter(labels[i] for i in train)
    val_counts = Counter(labels[i] for i in val)
    assert train_counts["d"] == 1 and val_counts["d"] == 0
    assert train_counts["c"] == 1 and val_counts["c"] == 1
    assert val_counts["a"] == 10 and val_counts["b"] == 2
    again = stratified_split(labels, 0.2, seed=1)
    assert (again[1] == val).all()
    assert not (stratified_split(labels, 0.2, seed=2)[1] == val).all()


def test_folds_refuse_too_rare_classes():
    with pytest.raises(MuseumError, match="fewer than 5 rows: b"):
        stratified_folds(["a"] * 10 + ["b"] * 3, 5)
