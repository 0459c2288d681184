"""Render the packaged HTML templates (`static/*.html`, jinja2).

Autoescape is on: class names, descriptions and error messages are user- or model-supplied
text, and every value that reaches the HTML is escaped by the template engine.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from jinja2 import Environment, PackageLoader, StrictUndefined

from museum import __version__
from museum.serve.jobs import Job
from museum.serve.limits import MB, Limits
from museum.serve.service import MAX_DESCRIPTION_CHARS, Prediction, Predictor

WHAT = {"text": "description", "image": "photo"}


def route_note(prediction: Prediction, thresholds: dict[str, float]) -> str:
    """What the route means for this item, in the same words as app.js's `routeNote`.

    An input counts as sure only above its threshold (strict `>`, as the cascade routes): a row
    with one modality goes to it however unsure it is, and the note must not call it sure then."""
    given = {kind: e for kind, e in prediction.experts.items() if e is not None}
    sure = {kind: e["probability"] > thresholds[kind] for kind, e in given.items()}
    route = prediction.route
    if route in WHAT and len(given) == 1:
        limit = f"{100 * thresholds[route]:.0f}%"
        return (f"only the {WHAT[route]} was used, and it was sure enough (above {limit})" if sure[route] else
                f"only the {WHAT[route]} was used: its best guess, not sure ({limit} or less)")
    if route in WHAT:
        return f"the {WHAT[route]} alone was sure enough"
    if route == "blend":
        return "neither was sure alone: both were blended" if not any(sure.values()) else "both were combined"
    return "no usable input: the most frequent class"


def static_file(name: str) -> bytes:
    """A file shipped in `museum/serve/static/`, by its fixed name."""
    return resources.files("museum.serve").joinpath("static", name).read_bytes()


@cache
def _environment() -> Environment:
    return Environment(loader=PackageLoader("museum.serve", "static"), autoescape=True, undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True)


def _experts_line(prediction: Prediction) -> str:
    return " · ".join(f"{kind} expert: {e['typology']} {100 * e['probability']:.1f}%"
                      for kind, e in prediction.experts.items() if e is not None)


def render_page(predictor: Predictor, limits: Limits, prediction: Prediction | None = None,
                error: str = "", description: str = "") -> str:
    """The main page, with a result (after a no-JS form post) or an error when given."""
    experts = predictor.experts
    loaded = [f"{kind} model ({len(m.classes_)} classes)" for kind, m in (("text", experts.text), ("image", experts.image))
              if m is not None]
    p = prediction
    thresholds = {"text": predictor.setup.config.text_threshold, "image": predictor.setup.config.image_threshold}
    return _environment().get_template("page.html").render(
        loaded=loaded, max_mb=limits.upload_bytes // MB, csv_mb=limits.csv_bytes // MB, max_chars=MAX_DESCRIPTION_CHARS,
        image_enabled=experts.image is not None, text_enabled=experts.text is not None,
        description=description, error=error, p=p, thresholds=thresholds,
        route_note=route_note(p, thresholds) if p else "", experts=_experts_line(p) if p else "", version=__version__,
    )


def render_job(job: Job) -> str:
    """The no-JS progress page of a submission job; it reloads itself until the job ends."""
    return _environment().get_template("job.html").render(job=job, running=job.state in ("queued", "running"))
