"""`museum submit` / `tune` / `evaluate` end to end, with small real models trained in the test."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from museum.cli import app
from museum.submit import check_submission
from csvrows import read_rows, write_rows  # noqa: E402

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def most_frequent_val_class(model_dir: Path) -> str:
    per_class = json.loads((model_dir / "metrics.json").read_text(encoding="utf-8"))["per_class"]
    return max(sorted(per_class), key=lambda c: per_class[c]["support"])


def test_submission_matches_the_sample_format(tmp_path, text_model_dir, museum_test_csv):
    sample = museum_test_csv.parent / "sample_submission.csv"
    out, proba = tmp_path / "sub.csv", tmp_path / "proba.csv"
    result = invoke("submit", museum_test_csv, "--text-model", text_model_dir, "--image-model", "none",
                    "--out", out, "--proba", proba, "--chunk-size", 300)
    assert result.exit_code == 0, result.output
    # Same header bytes, CRLF line ends, same guids in the same order, only known classes.
    ours, theirs = out.read_bytes(), sample.read_bytes()
    assert ours.split(b"\r\n")[0] == theirs.split(b"\r\n")[0] == b"guid,typology"
    assert ours.count(b"\r\n") == theirs.count(b"\r\n") and ours.endswith(b"\r\n")
    classes = json.loads((text_model_dir / "metrics.json").read_text(encoding="utf-8"))["classes"]
    assert check_submission(out, sample, classes) == []
    # The 547 rows without a description (and no images) take the fallback class.
    fallback = most_frequent_val_class(text_model_dir)
    test_rows, sub_rows, proba_rows = read_rows(museum_test_csv), read_rows(out), read_rows(proba)
    empty = [i for i, r in enumerate(test_rows) if not r["description"].strip()]
    assert len(empty) == 547
    assert {sub_rows[i]["typology"] for i in empty} == {fallback}
    assert Counter(r["route"] for r in proba_rows) == {"fallback": 547, "text": len(test_rows) - 547}
    assert [r["typology"] for r in proba_rows] == [r["typology"] for r in sub_rows]
    sums = [sum(float(r[c]) for c in classes) for r in proba_rows]
    np.testing.assert_allclose(sums, 1.0, atol=1e-4)
    # The summary table reports routes and availability.
    assert "route fallback" in result.output and "547" in result.output and "image no image model" in result.output


def test_chunk_size_does_not_change_the_output(tmp_path, text_model_dir, museum_test_csv):
    """Streaming in chunks of 7 rows gives the same submission as one big chunk."""
    outs = []
    for size in (7, 100_000):
        out = tmp_path / f"sub{size}.csv"
        assert invoke("submit", museum_test_csv, "--text-model", text_model_dir, "--image-model", "none",
                      "--out", out, "--proba", tmp_path / f"p{size}.csv", "--chunk-size", size).exit_code == 0
        probas = read_rows(tmp_path / f"p{size}.csv")
        outs.append((out.read_bytes(), [r["route"] for r in probas],
                     np.array([[float(v) for k, v in r.items() if k not in ("guid", "route", "typology")] for r in probas])))
    assert outs[0][0] == outs[1][0] and outs[0][1] == outs[1][1]
    # The text expert's float32 batches differ in the last digits with batch composition.
    np.testing.assert_allclose(outs[0][2], outs[1][2], atol=1e-4)


def test_fallback_option_and_unknown_fallback(tmp_path, text_model_dir, museum_test_csv):
    out = tmp_path / "sub.csv"
    result = invoke("submit", museum_test_csv, "--text-model", text_model_dir, "--image-model", "none",
                    "--out", out, "--fallback", "оружие")
    assert result.exit_code == 0, result.output
    empty = {r["guid"] for r in read_rows(museum_test_csv) if not r["description"].strip()}
    assert {r["typology"] for r in read_rows(out) if r["guid"] in empty} == {"оружие"}
    result = invoke("submit", museum_test_csv, "--text-model", text_model_dir, "--image-model", "none",
                    "--out", out, "--fallback", "nonsense")
    assert result.exit_code == 2 and "fallback class 'nonsense'" in result.output


def test_failing_run_leaves_the_earlier_submission_intact(tmp_path, text_model_dir, museum_test_csv):
    out = tmp_path / "sub.csv"
    assert invoke("submit", museum_test_csv, "--text-model", text_model_dir, "--image-model", "none",
                  "--out", out).exit_code == 0
    before = out.read_bytes()
    # A duplicate far down the file: the first chunks are written, then the run fails.
    rows = read_rows(museum_test_csv)
    bad = write_rows(tmp_path / "bad.csv", ["guid", "description"],
                     [[r["guid"], r["description"]] for r in rows] + [[rows[0]["guid"], "again"]])
    result = invoke("submit", bad, "--text-model", text_model_dir, "--image-model", "none",
                    "--out", out, "--chunk-size", 100, "--proba", tmp_path / "p.csv")
    assert result.exit_code == 2
    assert "duplicated guid" in result.output and f"line {len(rows) + 2}" in result.output
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "sub.csv"]  # no temp files, no p.csv


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_bad_inputs_give_one_line_errors(tmp_path, text_model_dir):
    no_guid = write_rows(tmp_path / "no_guid.csv", ["id", "description"], [["1", "x"]])
    assert "missing column(s) guid" in one_line_error(invoke("submit", no_guid, "--text-model", text_model_dir, "--image-model", "none"))
    dup = write_rows(tmp_path / "dup.csv", ["guid", "description"], [["a", "x"], ["a", "y"]])
    assert "line 3, field guid: duplicated guid 'a'" in one_line_error(
        invoke("submit", dup, "--text-model", text_model_dir, "--image-model", "none", "--out", tmp_path / "o.csv"))
    good = write_rows(tmp_path / "good.csv", ["guid", "description"], [["a", "Открытка"]])
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "text_model.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "junk" / "best.pt").write_bytes(b"not a checkpoint")
    for folder, kind in ((tmp_path / "nowhere", "text"), (tmp_path / "empty_dir", "text"),
                         (good, "text"), (tmp_path / "junk", "text"), (tmp_path / "junk", "image")):
        other = "image" if kind == "text" else "text"
        line = one_line_error(invoke("submit", good, f"--{kind}-model", folder, f"--{other}-model", "none"))
        assert str(folder) in line and f"--{kind}-model none" in line, line
    line = one_line_error(invoke("submit", good, "--text-model", "none", "--image-model", "none"))
    assert "at least one model" in line
    line = one_line_error(invoke("submit", good, "--text-model", text_model_dir, "--image-model", "none",
                                 "--text-threshold", "1.5"))
    assert "--text-threshold 1.5" in line
    line = one_line_error(invoke("submit", good, "--text-model", text_model_dir, "--image-model", "none",
                                 "--images", tmp_path / "no_images"))
    assert "--images" in line
    # outputs and settings that cannot work are refused before any row is scored
    line = one_line_error(invoke("submit", good, "--text-model", text_model_dir, "--image-model", "none",
                                 "--out", tmp_path / "empty_dir"))
    assert "--out" in line and "is a folder" in line
    line = one_line_error(invoke("submit", good, "--text-model", text_model_dir, "--image-model", "none",
                                 "--settings", tmp_path / "no_settings.json"))
    assert "--settings" in line and "no such file" in line
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("guid,description\na,two,fields too many\n", encoding="utf-8")
    line = one_line_error(invoke("submit", ragged, "--text-model", text_model_dir, "--image-model", "none"))
    assert "line 2: 3 field(s), the header has 2" in line


@pytest.fixture(scope="session")
def labelled_slice(tmp_path_factory, museum_train_csv) -> Path:
    """300 labelled rows the tiny text model did not train on, some with the description blanked."""
    rows = read_rows(museum_train_csv)[2000:2300]
    root = tmp_path_factory.mktemp("valid")
    return write_rows(root / "valid.csv", ["guid", "description", "typology"],
                      [[r["guid"], "" if i % 10 == 0 else r["description"], r["typology"]] for i, r in enumerate(rows)])


def test_tune_saves_settings_that_submit_uses(tmp_path, text_model_dir, labelled_slice):
    settings = tmp_path / "fusion.json"
    result = invoke("tune", "--valid", labelled_slice, "--text-model", text_model_dir, "--image-model", "none",
                    "--out", settings)
    assert result.exit_code == 0, result.output
    assert "<- defaults" in result.output and "chosen:" in result.output
    saved = json.loads(settings.read_text(encoding="utf-8"))
    assert saved["config"]["fallback"] == most_frequent_val_class(text_model_dir)
    assert saved["tuned_on"]["rows"] == 300 and saved["text_model"] == str(text_model_dir.resolve())
    # submit picks the saved settings up; an explicit option still wins.
    saved["config"]["fallback"] = "оружие"
    settings.write_text(json.dumps(saved), encoding="utf-8")
    out = tmp_path / "sub.csv"
    assert invoke("submit", labelled_slice, "--text-model", text_model_dir, "--image-model", "none",
                  "--settings", settings, "--out", out).exit_code == 0
    blank = [r["guid"] for i, r in enumerate(read_rows(labelled_slice)) if i % 10 == 0]
    predicted = {r["guid"]: r["typology"] for r in read_rows(out)}
    assert {predicted[g] for g in blank} == {"оружие"}
    assert invoke("submit", labelled_slice, "--text-model", text_model_dir, "--image-model", "none",
                  "--settings", settings, "--out", out, "--fallback", "документы").exit_code == 0
    predicted = {r["guid"]: r["typology"] for r in read_rows(out)}
    assert {predicted[g] for g in blank} == {"документы"}


def test_evaluate_reports_each_part(tmp_path, text_model_dir, labelled_slice):
    json_out = tmp_path / "metrics.json"
    result = invoke("evaluate", labelled_slice, "--text-model", text_model_dir, "--image-model", "none",
                    "--json", json_out)
    assert result.exit_code == 0, result.output
    for needle in ("all rows, text-only", "all rows, cascade", "cascade, route text", "cascade, route fallback",
                   "== text-only, all rows", "macro-F1"):
        assert needle in result.output
    metrics = json.loads(json_out.read_text(encoding="utf-8"))
    assert metrics["routes"]["fallback"]["n"] == 30 and metrics["all_rows"]["cascade"]["n"] == 300
    # Text alone and the cascade agree when there is no image model.
    assert metrics["all_rows"]["cascade"]["macro_f1"] == metrics["all_rows"]["text-only"]["macro_f1"]


# ----------------------------------------------------------------------------- both experts


@pytest.fixture(scope="session")
def multimodal_parts(tmp_path_factory, multimodal_dir) -> tuple[Path, Path, list[dict]]:
    """(image training CSV, a small labelled test set in the competition layout, its rows).

    The test layout copies 40 real held-out items and breaks some on purpose: one image
    zero-byte, one cut short, one missing, one row with a guid that is not a safe file name.
    """
    from museum.data.competition import stratified_split

    rows = read_rows(multimodal_dir / "train.csv")
    train_idx, test_idx = stratified_split([r["typology"] for r in rows], 0.3, seed=0)
    root = tmp_path_factory.mktemp("mm")
    header = ["guid", "description", "typology"]
    train = write_rows(root / "train.csv", header, [[rows[i][k] for k in header] for i in train_idx[:200]])
    test_rows = [rows[i] for i in test_idx[:40]]
    layout = root / "test"
    (layout / "images").mkdir(parents=True)
    for r in test_rows:
        source = multimodal_dir / "images" / f"{r['guid']}.jpg"
        if source.exists():
            (layout / "images" / source.name).write_bytes(source.read_bytes())
    ok = [r for r in test_rows if (layout / "images" / f"{r['guid']}.jpg").stat().st_size > 1000]
    (layout / "images" / f"{ok[0]['guid']}.jpg").write_bytes(b"")
    jpeg = (layout / "images" / f"{ok[1]['guid']}.jpg")
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    (layout / "images" / f"{ok[2]['guid']}.jpg").unlink()
    test_rows.append({"guid": "..evil", "description": "Открытка", "typology": ok[3]["typology"]})
    write_rows(layout / "labelled.csv", header, [[r[k] for k in header] for r in test_rows])
    return train, layout, test_rows


@pytest.fixture(scope="session")
def image_model_dir(tmp_path_factory, multimodal_dir, multimodal_parts) -> Path:
    """A tiny but real image model: 200 multimodal images, 32 px, one epoch, no pretrained weights."""
    from museum.config import ImageConfig
    from museum.train_image import train_image_model

    out = tmp_path_factory.mktemp("image") / "model"
    config = ImageConfig(weights="none", input_size=32, epochs=1, batch_size=16, workers=0, threads=1, freeze_epochs=0)
    train_image_model(config, multimodal_dir / "images", out, train_csv=multimodal_parts[0])
    return out


def test_both_experts_end_to_end(tmp_path, text_model_dir, image_model_dir, multimodal_parts):
    _, layout, rows = multimodal_parts
    labelled = layout / "labelled.csv"
    out, proba = tmp_path / "sub.csv", tmp_path / "proba.csv"
    # images/ beside the CSV is found without --images; thresholds chosen so every route occurs.
    result = invoke("submit", labelled, "--text-model", text_model_dir, "--image-model", image_model_dir,
                    "--out", out, "--proba", proba, "--workers", 1, "--text-threshold", 0.3)
    assert result.exit_code == 0, result.output
    assert [r["guid"] for r in read_rows(out)] == [r["guid"] for r in rows]
    for needle in ("image zero-byte", "image broken", "image missing", "image unsafe guid"):
        assert needle in result.output
    counts = {line.rsplit(None, 1)[0]: line.rsplit(None, 1)[1] for line in result.output.splitlines()
              if line.startswith("image ") and line.rsplit(None, 1)[1].isdigit()}
    files = {r["guid"]: layout / "images" / f"{r['guid']}.jpg" for r in rows}
    zero = sum(1 for p in files.values() if p.exists() and p.stat().st_size == 0)
    missing = sum(1 for g, p in files.items() if not p.exists() and g != "..evil")
    assert (counts["image zero-byte"], counts["image missing"], counts["image unsafe guid"]) == (str(zero), str(missing), "1")
    assert int(counts["image broken"]) >= 1
    assert sum(int(v) for v in counts.values()) == len(rows)
    by_guid = {r["guid"]: r for r in read_rows(proba)}
    for r in rows:
        got = by_guid[r["guid"]]
        has_text = bool(r["description"].strip())
        if not has_text and got["route"] != "fallback":
            assert got["route"] == "image"
        if got["route"] == "fallback":
            assert not has_text
    # Probability columns are the union of both experts' classes, by name.
    image_classes = json.loads((image_model_dir / "metrics.json").read_text(encoding="utf-8")).get("classes") or []
    header = list(next(iter(by_guid.values())).keys())[3:]
    assert header == sorted(header) and set(image_classes) <= set(header)

    result = invoke("evaluate", labelled, "--text-model", text_model_dir, "--image-model", image_model_dir,
                    "--workers", 1, "--report", tmp_path / "evaluation")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "evaluation" / "report.html").stat().st_size > 10_000
    assert "report:" in result.output
    for needle in ("all rows, text-only", "all rows, image-only", "all rows, cascade", "text+image rows, cascade"):
        assert needle in result.output
