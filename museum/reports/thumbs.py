"""Image thumbnails as `<img>` tags carrying a small JPEG as a data URI.

The clean and dedup pages show one thumbnail per item in a table, so each item gets its own
tiny JPEG (a few kB) rather than one mosaic PNG: a page of 100 items stays well under a
megabyte, and, like every report, opens with no network and no files beside it.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

from museum.reports.html import esc

THUMB = 96  # pixels on the longer side


def thumbnail_tag(path: str | Path | None, alt: str, size: int = THUMB) -> str:
    """`<img>` of the image at `path` fitting in size × size, or a grey note saying why it can't be shown."""
    from PIL import Image

    from museum.data.images import ImageDecodeError, safe_open_image

    if path is None:
        return '<span class="muted">no image</span>'
    try:
        img = safe_open_image(path, draft=size)
    except ImageDecodeError as exc:  # a moved or broken file still yields a page
        return f'<span class="muted">{esc(exc.reason)}</span>'
    if max(img.size) > size:
        img.thumbnail((size, size))
    elif max(img.size) * 2 <= size:  # blow 28-px images up by whole pixels so they stay visible
        k = size // max(img.size)
        img = img.resize((img.width * k, img.height * k), Image.NEAREST)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=80)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (f'<img src="data:image/jpeg;base64,{data}" alt="{esc(alt)}" width="{img.width}" '
            f'height="{img.height}" style="margin:0;display:inline-block">')
