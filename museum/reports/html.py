"""Self-contained HTML pages: inline CSS, figures embedded as base64, no script and no network.

A report must open from a mail attachment or a copied folder, so nothing is linked: every
figure travels inside the page. The markup lives in jinja2 templates (`templates/`: the page,
its CSS and the building blocks below as macros) rendered with autoescape on, so every class
name, description, path or option value is escaped; what the helpers return is `Markup`, which
passes into another helper or the page unescaped, and anything else is escaped there.
"""

from __future__ import annotations

import base64
from functools import cache
from pathlib import Path
from typing import Iterable, Sequence

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from museum.utils import atomic_path

__all__ = ["Markup", "cards", "figure_grid", "fmt", "heading", "image", "key_values", "muted", "note", "page", "png",
           "section", "table", "write_page"]

LONG_TEXT = 60  # characters from which a table cell is text to wrap (a description), not a short value


def fmt(value) -> str:
    """Numbers to 3-4 significant decimals, None as a dash, everything else as text (escaped by the template)."""
    if isinstance(value, Markup):
        return value
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


@cache
def environment() -> Environment:
    env = Environment(loader=PackageLoader("museum.reports", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = fmt
    env.tests["numeric"] = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    env.tests["long_text"] = lambda v: isinstance(v, str) and len(v) > LONG_TEXT
    return env


def macros(template: str = "parts.html"):
    """The macros of a template in `templates/`, callable from Python (each returns Markup)."""
    return environment().get_template(template).module


def table(header: Sequence[str], rows: Iterable[Sequence], bad_rows: Iterable[bool] = ()) -> Markup:
    """A table; numeric cells right-aligned, rows flagged in `bad_rows` shaded red."""
    rows = list(rows)
    bad = list(bad_rows)[:len(rows)]
    return macros().table(list(header), rows, bad + [False] * (len(rows) - len(bad)))


def cards(items: dict) -> Markup:
    """Headline numbers as a row of cards."""
    return macros().cards(items)


def key_values(items: dict) -> Markup:
    """Many short settings as a compact multi-column list."""
    return macros().key_values(items)


def figure_grid(figures: Iterable[tuple[Markup, Markup, bool]]) -> Markup:
    """A wrapping grid of (image tag, caption, wrong) cells; wrong ones framed in red."""
    return macros().figure_grid(list(figures))


def image(data: bytes, mime: str, alt: str, width: int | None = None, height: int | None = None) -> Markup:
    """An `<img>` carrying `data` as a base64 data URI (with a fixed `width` × `height` when given)."""
    return macros().image(base64.b64encode(data).decode("ascii"), mime, alt, width, height)


def png(path: Path, alt: str) -> Markup:
    """An `<img>` carrying the PNG file's bytes."""
    return image(Path(path).read_bytes(), "image/png", alt)


def note(text: str) -> Markup:
    return macros().note(text)


def heading(text: str) -> Markup:
    """A sub-heading inside a section."""
    return macros().heading(text)


def muted(text: str, tag: str = "span") -> Markup:
    """Grey text (a `<span>`, or a paragraph with tag="p")."""
    return macros().muted(text, tag)


def section(title: str, *parts) -> Markup:
    """`<section>` with a heading; parts that are not Markup are escaped as text."""
    return macros().section(title, *parts)


def page(title: str, subtitle: str, sections: Iterable) -> str:
    """A complete HTML document."""
    return environment().get_template("page.html").render(title=title, subtitle=subtitle, sections=list(sections)) + "\n"


def write_page(path: Path, text: str) -> Path:
    """Write the page atomically as UTF-8."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
