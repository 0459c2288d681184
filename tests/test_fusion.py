"""The cascade's arithmetic on hand-made probability vectors: routing, alignment, ties, tuning."""

from __future__ import annotations

import numpy as np
import pytest

from museum.config import FusionConfig
from museum.errors import MuseumError
from museum.fusion import (
    BLEND,
    FALLBACK,
    IMAGE,
    TEXT,
    Cascade,
    StackerRule,
    WeightedRule,
    align,
    choose_fusion,
    fit_stacker,
    fit_weighted,
    rule_from_settings,
    save_fusion,
    fast_macro_f1,
    grid_predictions,
    load_settings,
    merge_config,
    save_settings,
    tune_cascade,
    union_classes,
)
from museum.metrics import macro_f1

CLASSES = ["a", "b", "c"]
NAN = [np.nan] * 3


def run(text_rows, image_rows, fallback="c", **kw):
    """Route rows given as lists (None = modality absent) through a Cascade over CLASSES."""
    has_text = np.array([r is not None for r in text_rows])
    has_image = np.array([r is not None for r in image_rows])
    text_p = np.array([NAN if r is None else r for r in text_rows], dtype=float)
    image_p = np.array([NAN if r is None else r for r in image_rows], dtype=float)
    cascade = Cascade(CLASSES, fallback=fallback, **kw)
    return cascade, cascade.combine(text_p, image_p, has_text, has_image)


def test_every_route():
    text = [[0.8, 0.1, 0.1], [0.5, 0.4, 0.1], [0.5, 0.4, 0.1], [0.6, 0.3, 0.1], None, None]
    image = [[0.0, 0.0, 1.0], [0.1, 0.1, 0.8], [0.0, 0.6, 0.4], None, [0.2, 0.5, 0.3], None]
    cascade, out = run(text, image)
    assert out.routes.tolist() == [TEXT, IMAGE, BLEND, TEXT, IMAGE, FALLBACK]
    # blend 0.5*[.5,.4,.1] + 0.5*[0,.6,.4] = [.25,.5,.25] -> b
    assert out.labels(CLASSES) == ["a", "c", "b", "a", "b", "c"]
    np.testing.assert_allclose(out.proba[2], [0.25, 0.5, 0.25])
    np.testing.assert_allclose(out.proba[5], [0, 0, 1])  # fallback rows are one-hot


def test_threshold_is_strict_at_exactly_0_7():
    # float32 0.7 (as a model returns it) and float64 0.7 are both "not sure".
    text = np.array([[0.7, 0.2, 0.1], [0.7000001, 0.2, 0.0999999]], dtype=np.float32)
    image = np.array([[0.1, 0.2, 0.7], [0.1, 0.2, 0.7]])
    out = Cascade(CLASSES, fallback="a").combine(text, image, np.ones(2, bool), np.ones(2, bool))
    assert out.routes.tolist() == [BLEND, TEXT]
    _, out = run([[0.2, 0.1, 0.7]], [[0.7, 0.3, 0.0]])
    assert out.routes.tolist() == [BLEND]
    _, out = run([None], [[0.7, 0.3, 0.0]])
    assert out.routes.tolist() == [IMAGE]  # the only modality, however unsure


def test_ties_break_by_class_order():
    _, out = run([[0.4, 0.4, 0.2], None], [None, [0.1, 0.45, 0.45]])
    assert out.labels(CLASSES) == ["a", "b"]
    # A blend that ties exactly also goes to the first class.
    _, out = run([[0.6, 0.4, 0.0]], [[0.4, 0.6, 0.0]], blend_weight=0.5)
    assert out.routes.tolist() == [BLEND] and out.labels(CLASSES) == ["a"]


def test_blend_weight_extremes():
    text, image = [[0.6, 0.4, 0.0]], [[0.0, 0.3, 0.7]]
    assert run(text, image, blend_weight=1.0)[1].labels(CLASSES) == ["a"]
    assert run(text, image, blend_weight=0.0)[1].labels(CLASSES) == ["c"]


def test_alignment_is_by_name_not_position():
    union = union_classes(["b", "a", "d"], ["c", "a"])
    assert union == ["a", "b", "c", "d"]
    text = align(np.array([[0.1, 0.7, 0.2]]), ["b", "a", "d"], union)
    image = align(np.array([[0.9, 0.1]]), ["c", "a"], union)
    np.testing.assert_allclose(text, [[0.7, 0.1, 0.0, 0.2]])
    np.testing.assert_allclose(image, [[0.1, 0.0, 0.9, 0.0]])
    out = Cascade(union, fallback="a", text_threshold=0.7).combine(text, image, np.ones(1, bool), np.ones(1, bool))
    assert out.labels(union) == ["c"]  # text 0.7 is not > 0.7; image 0.9 is


def test_alignment_errors():
    with pytest.raises(MuseumError, match="duplicates"):
        union_classes(["a", "a"])
    with pytest.raises(MuseumError, match="shape"):
        align(np.zeros((2, 3)), ["a", "b"], ["a", "b"])
    with pytest.raises(MuseumError, match="not in the cascade"):
        align(np.zeros((1, 1)), ["z"], ["a"])


def test_fallback_must_be_a_known_class():
    with pytest.raises(MuseumError, match="fallback class 'zzz'"):
        Cascade(CLASSES, fallback="zzz")
    with pytest.raises(MuseumError, match="no classes"):
        Cascade([], fallback="a")


def test_empty_input():
    out = Cascade(CLASSES, fallback="a").combine(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0, bool), np.zeros(0, bool))
    assert out.proba.shape == (0, 3) and out.pred.shape == (0,)


def test_fast_macro_f1_matches_sklearn():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 5, 300), rng.integers(0, 6, 300)
    names = [str(i) for i in range(6)]
    assert fast_macro_f1(y, p, 6) == pytest.approx(macro_f1([names[i] for i in y], [names[i] for i in p]))


def test_grid_contains_the_cascade():
    """Every grid setting predicts exactly what Cascade.combine predicts with it."""
    rng = np.random.default_rng(1)
    n = 60
    text_p, image_p = rng.dirichlet(np.ones(3), n), rng.dirichlet(np.ones(3), n)
    has_text, has_image = rng.random(n) < 0.7, rng.random(n) < 0.7
    text_p[~has_text], image_p[~has_image] = np.nan, np.nan
    grid = grid_predictions(text_p, image_p, has_text, has_image, fallback_idx=2, thresholds=(0.4, 0.7), weights=(0.3, 0.5))
    for (tt, it, w), pred in zip(grid.settings, grid.preds):
        out = Cascade(CLASSES, tt, it, w, "c").combine(text_p, image_p, has_text, has_image)
        assert pred.tolist() == out.pred.tolist()


def _synthetic(n, seed, text_noise, image_noise):
    """Labelled rows where text and image are noisy one-hot-ish views of the label."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    def view(noise):
        logits = np.eye(3)[y] * 2 + rng.normal(0, noise, (n, 3))
        e = np.exp(logits)
        return e / e.sum(1, keepdims=True)
    return y, view(text_noise), view(image_noise), np.ones(n, bool), np.ones(n, bool)


def test_tune_keeps_defaults_on_a_tiny_set():
    y, t, i, ht, hi = _synthetic(30, 0, 1.0, 1.0)
    result = tune_cascade(t, i, ht, hi, y, CLASSES, "a", FusionConfig())
    assert result.chosen == (0.7, 0.7, 0.5) and not result.accepted
    assert "too few" in result.reason


def test_tune_adopts_a_clear_gain_and_rejects_noise():
    # Text is pure noise, image is informative: the default (text first, 0.5 blend) is clearly beaten.
    rng = np.random.default_rng(3)
    y, _, image, ht, hi = _synthetic(600, 2, 1.0, 0.8)
    text = rng.dirichlet(np.ones(3) * 0.3, 600)
    result = tune_cascade(text, image, ht, hi, y, CLASSES, "a", FusionConfig())
    assert result.accepted and result.cv_gain >= 0.005
    assert result.chosen != (0.7, 0.7, 0.5) and result.best_f1 > result.default_f1
    # With a huge min_gain the same evidence is not enough: the defaults stay.
    strict = tune_cascade(text, image, ht, hi, y, CLASSES, "a", FusionConfig(tune_min_gain=1.0))
    assert strict.chosen == (0.7, 0.7, 0.5) and not strict.accepted and "kept the defaults" in strict.reason


def test_tune_is_reproducible_and_handles_unknown_labels():
    y, t, i, ht, hi = _synthetic(200, 5, 1.5, 1.5)
    y = y.copy()
    y[:5] = 3  # a class no model knows: always wrong, still counted
    a = tune_cascade(t, i, ht, hi, y, CLASSES, "a", FusionConfig())
    b = tune_cascade(t, i, ht, hi, y, CLASSES, "a", FusionConfig())
    assert a == b


def test_settings_round_trip(tmp_path):
    path = tmp_path / "fusion.json"
    save_settings(path, FusionConfig(text_threshold=0.8, fallback="b"), text_model="x")
    config, data = load_settings(path)
    assert config.text_threshold == 0.8 and config.fallback == "b" and data["text_model"] == "x"
    merged = merge_config(config, {"text_threshold": None, "image_threshold": 0.6})
    assert merged.text_threshold == 0.8 and merged.image_threshold == 0.6
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(MuseumError, match="not a museum fusion settings file"):
        load_settings(path)
    path.write_text("{broken", encoding="utf-8")
    with pytest.raises(MuseumError, match="not valid JSON"):
        load_settings(path)


# ----------------------------------------------------------------------------- learned rules


def test_weighted_rule_routes_and_arithmetic():
    text = np.array([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], NAN, NAN])
    image = np.array([[0.1, 0.8, 0.1], NAN, [0.2, 0.2, 0.6], NAN])
    has_text, has_image = np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool)
    out = WeightedRule(CLASSES, 1.0, 2.0, "a").combine(text, image, has_text, has_image)
    assert out.rule == "weighted" and out.routes.tolist() == [BLEND, TEXT, IMAGE, FALLBACK]
    expected = np.exp(np.log([0.6, 0.3, 0.1]) + 2 * np.log([0.1, 0.8, 0.1]))
    np.testing.assert_allclose(out.proba[0], expected / expected.sum())
    np.testing.assert_allclose(out.proba[1], text[1])  # one modality: that expert alone
    np.testing.assert_allclose(out.proba[2], image[2])
    np.testing.assert_allclose(out.proba[3], [1, 0, 0])
    assert out.labels(CLASSES) == ["b", "a", "c", "a"]
    # A class the image expert does not know (aligned 0) is not vetoed by it.
    blind = WeightedRule(CLASSES, 1.0, 1.0, "a", image_known=[True, True, False])
    out = blind.combine(np.array([[0.1, 0.1, 0.8]]), np.array([[0.5, 0.5, 0.0]]), np.ones(1, bool), np.ones(1, bool))
    assert out.labels(CLASSES) == ["c"]


def test_fit_weighted_trusts_the_informative_expert():
    rng = np.random.default_rng(3)
    y, _, image, ht, hi = _synthetic(400, 2, 1.0, 0.8)
    text = rng.dirichlet(np.ones(3) * 0.3, 400)  # noise
    rule = fit_weighted(text, image, ht, hi, y, CLASSES, "a")
    assert rule.image_weight > 0.5 and rule.text_weight < 0.1 * rule.image_weight


def test_stacker_fits_routes_and_leaves_unseen_classes_to_its_base():
    y, text, image, ht, hi = _synthetic(300, 4, 1.0, 1.0)
    ht[:40], hi[40:80] = False, False
    text[:40], image[40:80] = np.nan, np.nan
    rule = fit_stacker(text, image, ht, hi, y, CLASSES, "a")
    out = rule.combine(text, image, ht, hi)
    assert rule.seen is None and rule.base is None
    assert out.rule == "stacker" and out.routes[:40].tolist() == [IMAGE] * 40 and out.routes[40:80].tolist() == [TEXT] * 40
    assert fast_macro_f1(y, out.pred, 3) > 0.8
    np.testing.assert_allclose(out.proba.sum(1), 1.0)
    # Class c never labelled: the regression ranks a and b, the weighted base decides c's share.
    rows = y < 2
    partial = fit_stacker(text[rows], image[rows], ht[rows], hi[rows], y[rows], CLASSES, "a")
    assert partial.seen == [True, True, False] and partial.base["kind"] == "weighted"
    out = partial.combine(text, image, ht, hi)
    np.testing.assert_allclose(out.proba.sum(1), 1.0)
    sure_c = np.array([[0.02, 0.03, 0.95]])
    assert partial.combine(sure_c, sure_c, np.ones(1, bool), np.ones(1, bool)).labels(CLASSES) == ["c"]
    assert fast_macro_f1(y[rows], out.pred[rows], 3) > 0.8
    with pytest.raises(MuseumError, match="do not fit 3 classes"):
        StackerRule(CLASSES, [[0.0] * 7] * 3, [0.0] * 3, "a")
    with pytest.raises(MuseumError, match="without a base rule"):
        StackerRule(CLASSES, [[0.0] * 8] * 3, [0.0] * 3, "a", seen=[True, True, False])


def test_choose_fusion_beats_a_bad_default_only_with_evidence(monkeypatch):
    import museum.fusion

    monkeypatch.setattr(museum.fusion, "INNER_REPEATS", 1)  # one inner CV is enough evidence here, and 3× faster
    rng = np.random.default_rng(3)
    y, _, image, ht, hi = _synthetic(600, 2, 1.0, 0.8)
    text = rng.dirichlet(np.ones(3) * 0.3, 600)  # confident noise: the text-first default suffers
    choice = choose_fusion(text, image, ht, hi, y, CLASSES, "a", FusionConfig())
    assert set(choice.estimates) == {"default", "cascade", "weighted", "stacker"}
    assert choice.name != "default" and choice.chosen_f1 - choice.default_f1 >= 0.005
    assert choice.rule.combine(text, image, ht, hi).rule == choice.rule.kind
    again = choose_fusion(text, image, ht, hi, y, CLASSES, "a", FusionConfig())
    assert again.estimates == choice.estimates  # seeded
    strict = choose_fusion(text, image, ht, hi, y, CLASSES, "a", FusionConfig(tune_min_gain=1.0))
    assert strict.name == "default" and isinstance(strict.rule, Cascade) and "kept the default" in strict.reason
    tiny = choose_fusion(text[:30], image[:30], ht[:30], hi[:30], y[:30], CLASSES, "a", FusionConfig())
    assert tiny.name == "default" and "too few" in tiny.reason
    # Labels of one class only: no regression to fit, the stacker is not offered.
    single = choose_fusion(text, image, ht, hi, np.zeros_like(y), CLASSES, "a", FusionConfig())
    assert "stacker" in single.skipped and "stacker" not in single.estimates


@pytest.mark.parametrize("rule", [
    Cascade(CLASSES, 0.9, 0.2, 0.3, "b"),
    WeightedRule(CLASSES, 0.4, 1.3, "b", image_known=[True, False, True]),
    StackerRule(CLASSES, np.arange(24.0).reshape(3, 8).tolist(), [0.1, 0.2, 0.3], "b"),
    StackerRule(CLASSES, np.arange(24.0).reshape(3, 8).tolist(), [0.1, 0.2, 0.0], "b", [True, True, False],
                WeightedRule(CLASSES, 0.5, 0.7, "b").to_dict()),
])
def test_fusion_settings_round_trip(tmp_path, rule):
    from museum.fusion import FusionChoice

    path = tmp_path / "fusion.json"
    choice = FusionChoice(rule, rule.kind, {"default": {"all": 0.5, "both": 0.4}}, 0.5, 0.6, "test", rows=60)
    save_fusion(path, choice, FusionConfig(fallback="b"), text_model="t")
    config, data = load_settings(path)
    assert data["fusion"]["name"] == rule.kind and data["text_model"] == "t"
    again = rule_from_settings(data, CLASSES, config)
    assert type(again) is type(rule) and again == rule
    if isinstance(rule, Cascade):  # an older reader routes with the same thresholds from `config`
        assert (config.text_threshold, config.image_threshold, config.blend_weight) == (0.9, 0.2, 0.3)
    else:
        with pytest.raises(MuseumError, match="re-run museum tune --cross-fit"):
            rule_from_settings(data, CLASSES + ["d"], config)


def test_old_settings_files_give_the_cascade(tmp_path):
    path = tmp_path / "fusion.json"
    save_settings(path, FusionConfig(text_threshold=0.8, fallback="b"), classes=CLASSES)  # what `museum tune` wrote
    config, data = load_settings(path)
    rule = rule_from_settings(data, CLASSES, config)
    assert isinstance(rule, Cascade) and rule.text_threshold == 0.8 and rule.fallback == "b"
    assert isinstance(rule_from_settings(None, CLASSES, FusionConfig(fallback="a")), Cascade)
