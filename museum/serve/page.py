"""Render the packaged HTML templates (`static/*.html`, `string.Template` syntax).

Every value that reaches the HTML goes through `html.escape`: class names, descriptions
and error messages are user- or model-supplied text.
"""

from __future__ import annotations

from html import escape
from importlib import resources
from string import Template

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


def _template(name: str) -> Template:
    return Template(static_file(name).decode("utf-8"))


def _bars(prediction: Prediction) -> str:
    rows = []
    for name, p in prediction.top():
        rows.append(
            f'<li><span class="name" title="{escape(name)}">{escape(name)}</span>'
            f'<span class="bar"><span class="fill" style="width:{100 * p:.1f}%"></span></span>'
            f'<span class="pct">{100 * p:.1f}%</span></li>'
        )
    return "".join(rows)


def _experts_line(prediction: Prediction) -> str:
    parts = [f"{kind} expert: {e['typology']} {100 * e['probability']:.1f}%"
             for kind, e in prediction.experts.items() if e is not None]
    return escape(" · ".join(parts))


def render_page(predictor: Predictor, limits: Limits, prediction: Prediction | None = None,
                error: str = "", description: str = "") -> str:
    """The main page, with a result (after a no-JS form post) or an error when given."""
    experts = predictor.experts
    loaded = [f"{kind} model ({len(m.classes_)} classes)" for kind, m in (("text", experts.text), ("image", experts.image))
              if m is not None]
    p = prediction
    thresholds = {"text": predictor.setup.config.text_threshold, "image": predictor.setup.config.image_threshold}
    return _template("page.html").substitute(
        models=escape("Loaded: " + ", ".join(loaded)),
        max_mb=limits.upload_bytes // MB,
        csv_mb=limits.csv_bytes // MB,
        max_chars=MAX_DESCRIPTION_CHARS,
        image_disabled="" if experts.image is not None else "disabled",
        text_disabled="" if experts.text is not None else "disabled",
        description=escape(description),
        error=escape(error),
        error_hidden="" if error else "hidden",
        result_hidden="" if p else "hidden",
        typology=escape(p.typology) if p else "",
        route=escape(p.route) if p else "",
        route_note=escape(route_note(p, thresholds)) if p else "",
        text_threshold=thresholds["text"],
        image_threshold=thresholds["image"],
        bars=_bars(p) if p else "",
        experts=_experts_line(p) if p else "",
        warnings="".join(f"<li>{escape(w)}</li>" for w in p.warnings) if p else "",
        version=__version__,
    )


def render_job(job: Job) -> str:
    """The no-JS progress page of a submission job; it reloads itself until the job ends."""
    running = job.state in ("queued", "running")
    if job.state == "done":
        body = f'<p><a href="/jobs/{job.id}/submission.csv" download="submission.csv">Download submission.csv</a></p>'
    elif job.state == "error":
        body = f'<p class="error">{escape(job.error)}</p>'
    else:
        body = '<p class="hint">This page reloads every second.</p>'
    return _template("job.html").substitute(
        refresh='<meta http-equiv="refresh" content="1">' if running else "",
        state=escape(job.state), total=job.rows_total,
        done=job.rows_done, body=body,
    )
