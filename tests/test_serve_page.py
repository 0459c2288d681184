"""The serve page's note on how an item was decided: the server (no-JS page) and app.js say the same,
and a row with one modality is called sure only above that modality's threshold."""

from __future__ import annotations

import html
import json
import re

import pytest

from browser import dump_dom
from museum.serve.page import route_note, static_file
from museum.serve.service import Prediction

THRESHOLDS = {"text": 0.7, "image": 0.6}


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
    page = static_file("page.html").decode("utf-8")
    page = re.sub(r"\$(\w+)", lambda m: {"text_threshold": "0.7", "image_threshold": "0.6"}.get(m.group(1), ""), page)
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
