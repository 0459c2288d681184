"""The serve page's note on how an item was decided: the server (no-JS page) and app.js say the same,
and a row with one modality is called sure only above that modality's threshold."""

from __future__ import annotations

import html
import json
import re
from types import SimpleNamespace

import pytest

from browser import dump_dom
from museum.serve.limits import Limits
from museum.serve.page import render_job, render_page, route_note, static_file
from museum.serve.service import Prediction

THRESHOLDS = {"text": 0.7, "image": 0.6}
HOSTILE = '<script>alert(1)</script> & "quotes" \'single\' <b>bold</b>'


def _predictor(text_classes: list[str] | None = None):
    """What render_page reads of a Predictor: its experts' classes and the routing thresholds."""
    text = SimpleNamespace(classes_=text_classes) if text_classes else None
    config = SimpleNamespace(text_threshold=THRESHOLDS["text"], image_threshold=THRESHOLDS["image"])
    return SimpleNamespace(experts=SimpleNamespace(text=text, image=None), setup=SimpleNamespace(config=config))


def _prediction(route: str, text: float | None, image: float | None) -> Prediction:
    experts = {kind: None if p is None else {"typology": "графика", "probability": p}
               for kind, p in (("text", text), ("image", image))}
    return Prediction(typology="графика", route=route, classes=["графика"], probabilities=[1.0], experts=experts)


# (route, text expert's top probability or None when no description, the image expert's likewise)
CASES = [("text", 0.95, None), ("text", 0.55, None), ("text", 0.7, None), ("image", None, 0.61), ("image", None, 0.3),
         ("text", 0.9, 0.4), ("image", 0.5, 0.9), ("blend", 0.5, 0.5), ("blend", 0.9, 0.9), ("fallback", None, None)]


def test_one_modality_is_sure_only_above_its_threshold():
    notes = {case: route_note(_prediction(*case), THRESHOLDS) for case in CASES}
    assert notes[("text", 0.95, None)] == "only the description was used, and it was sure enough (above 70%)"
    assert notes[("text", 0.55, None)] == "only the description was used: its best guess, not sure (70% or less)"
    assert notes[("text", 0.7, None)] == notes[("text", 0.55, None)]  # strict `>`, as the cascade routes
    assert "sure enough (above 60%)" in notes[("image", None, 0.61)] and "not sure" in notes[("image", None, 0.3)]
    assert notes[("text", 0.9, 0.4)] == "the description alone was sure enough"
    assert notes[("blend", 0.5, 0.5)] == "neither was sure alone: both were blended"
    assert notes[("blend", 0.9, 0.9)] == "both were combined"  # a learned rule blends even sure inputs


def test_app_js_says_what_the_server_says(tmp_path):
    """app.js's `routeNote` run in Chromium on the page's own template, for every case."""
    page = render_page(_predictor(), Limits())
    responses = [{"route": route, "experts": {kind: None if p is None else {"typology": "графика", "probability": p}
                                              for kind, p in (("text", text), ("image", image))}}
                 for route, text, image in CASES]
    script = (f"<script>{static_file('app.js').decode('utf-8')}</script><script>"
              "const out = document.body.appendChild(document.createElement('pre')); out.id = 'notes';"
              f"out.textContent = JSON.stringify({json.dumps(responses)}.map(routeNote));</script>")
    path = tmp_path / "page.html"
    path.write_text(page.replace('<script src="/static/app.js"></script>', script), encoding="utf-8")
    match = re.search(r'<pre id="notes">(.*?)</pre>', dump_dom(path), re.S)
    assert match, "app.js did not run"
    assert json.loads(html.unescape(match.group(1))) == [route_note(_prediction(*c), THRESHOLDS) for c in CASES]


@pytest.mark.parametrize("name", ["page.html", "app.js"])
def test_no_unconditional_sure_enough_left(name):
    text = static_file(name).decode("utf-8")
    assert "alone was sure enough\"" not in text and "ROUTE_NOTES" not in text


def test_pages_escape_every_model_and_user_string():
    """Class names, descriptions, warnings and errors reach the page as text (jinja2 autoescape), never as markup."""
    prediction = Prediction(typology=HOSTILE, route="text", classes=[HOSTILE, "b"], probabilities=[0.75, 0.25],
                            experts={"text": {"typology": HOSTILE, "probability": 0.75}, "image": None},
                            warnings=[HOSTILE])
    page = render_page(_predictor([HOSTILE, "b"]), Limits(), prediction, error=HOSTILE, description=HOSTILE)
    job = render_job(SimpleNamespace(id="abc", state="error", error=HOSTILE, rows_total=3, rows_done=1))
    for text in (page, job):
        assert "<script>alert" not in text and "<b>bold" not in text
    escaped = html.escape(HOSTILE, quote=True).replace("&#x27;", "&#39;").replace("&quot;", "&#34;")
    assert page.count(escaped) == 7  # typology, bar name and its title, experts line, description, error, warning
    assert 'style="width:75.0%"' in page and "text expert: &lt;script&gt;" in page
    assert escaped in job and "1 of 3 rows · error" in job and 'http-equiv="refresh"' not in job
    running = render_job(SimpleNamespace(id="abc", state="running", error="", rows_total=3, rows_done=1))
    assert 'http-equiv="refresh"' in running and "reloads every second" in running
    empty = render_page(_predictor(), Limits())
    assert re.search(r'<section id="result"[^>]* hidden>', empty) and 'role="alert" hidden>' in empty
    assert re.search(r'<input id="image"[^>]* disabled>', empty) and re.search(r'<textarea[^>]* disabled>', empty)
