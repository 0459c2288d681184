"""Self-contained HTML pages: inline CSS, PNGs embedded as base64, no script and no network.

A report must open from a mail attachment or a copied folder, so nothing is linked: every
figure travels inside the page.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Iterable, Sequence

from museum.utils import atomic_path

CSS = """
body { font-family: "DejaVu Sans", "Segoe UI", Arial, sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 1.5em; color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #4c72b0; padding-bottom: 0.2em; margin-top: 1.8em; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f3f8; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.bad td { background: #fdecea; }
img { max-width: 100%; height: auto; display: block; margin: 0.6em 0; }
.cards { display: flex; flex-wrap: wrap; gap: 0.8em; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 0.5em 1em; min-width: 8em; }
.card b { display: block; font-size: 1.5em; }
.note { background: #fff8e1; border-left: 4px solid #f9a825; padding: 0.5em 1em; margin: 0.6em 0; }
.muted { color: #777; } td.text { max-width: 40em; }
.kv { display: grid; grid-template-columns: repeat(auto-fill, minmax(17em, 1fr)); gap: 0.2em 1.2em; font-size: 0.9em; }
.kv div { border-bottom: 1px dotted #ddd; } .kv span { color: #777; } .kv i { color: #777; font-style: normal; }
.grid { display: flex; flex-wrap: wrap; gap: 0.9em 0.7em; margin: 0.6em 0; }
.grid figure { margin: 0; width: 176px; font-size: 0.8em; line-height: 1.25; overflow-wrap: anywhere; }
.grid .frame { width: 168px; height: 168px; display: flex; align-items: center; justify-content: center;
               border: 2px solid #2e7d32; border-radius: 3px; background: #f6f6f6; }
.grid figure.wrong .frame { border: 4px solid #c62828; width: 164px; height: 164px; }
.grid img { max-width: 100%; max-height: 100%; margin: 0; }
.grid figcaption { margin-top: 0.3em; } .grid .pred { color: #2e7d32; } .grid .wrong .pred { color: #c62828; font-weight: bold; }
"""


class Raw(str):
    """Markup built here from escaped parts: `fmt` passes it through as is."""


def esc(value) -> str:
    """HTML-escaped text of any value."""
    return html.escape(str(value), quote=True)


def fmt(value) -> str:
    """Numbers to 3-4 significant decimals, everything else as text; escaped."""
    if isinstance(value, Raw):
        return value
    if isinstance(value, bool) or value is None:
        return esc("—" if value is None else value)
    if isinstance(value, float):
        return esc(f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}")
    if isinstance(value, int):
        return esc(f"{value:,}")
    return esc(value)


def png(path: Path, alt: str) -> str:
    """An `<img>` carrying the PNG file's bytes as a data URI."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">'


def table(header: Sequence[str], rows: Iterable[Sequence], bad_rows: Iterable[bool] = ()) -> str:
    """A table; numeric cells right-aligned, rows flagged in `bad_rows` shaded red."""
    bad = list(bad_rows)
    out = ["<table><thead><tr>", *(f"<th>{esc(h)}</th>" for h in header), "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        cls = ' class="bad"' if i < len(bad) and bad[i] else ""
        cells = []
        for cell in row:
            numeric = isinstance(cell, (int, float)) and not isinstance(cell, bool)
            long_text = isinstance(cell, str) and len(cell) > 60
            kind = ' class="num"' if numeric else ' class="text"' if long_text else ""
            cells.append(f"<td{kind}>{fmt(cell)}</td>")
        out.append(f"<tr{cls}>{''.join(cells)}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def cards(items: dict) -> str:
    """Headline numbers as a row of cards."""
    return '<div class="cards">' + "".join(
        f'<div class="card"><span class="muted">{esc(k)}</span><b>{fmt(v)}</b></div>' for k, v in items.items()
    ) + "</div>"


def key_values(items: dict) -> str:
    """Many short settings as a compact multi-column list."""
    return '<div class="kv">' + "".join(f"<div><span>{esc(k)}</span> {fmt(v)}</div>" for k, v in items.items()) + "</div>"


def figure_grid(figures: Iterable[tuple[str, str, bool]]) -> str:
    """A wrapping grid of (image tag, caption markup, wrong) cells; wrong ones framed in red."""
    cells = [f'<figure class="{"wrong" if wrong else "right"}"><div class="frame">{image}</div>'
             f"<figcaption>{caption}</figcaption></figure>" for image, caption, wrong in figures]
    return f'<div class="grid">{"".join(cells)}</div>'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def section(title: str, *parts: str) -> str:
    return f"<section><h2>{esc(title)}</h2>{''.join(parts)}</section>"


def page(title: str, subtitle: str, sections: Iterable[str]) -> str:
    """A complete HTML document."""
    return (
        '<!DOCTYPE html>\n<html lang="ru"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{esc(title)}</h1><p class=\"sub\">{esc(subtitle)}</p>{''.join(sections)}</body></html>\n"
    )


def write_page(path: Path, text: str) -> Path:
    """Write the page atomically as UTF-8."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
