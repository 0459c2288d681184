"""Image thumbnails as `<img>` tags carrying a small JPEG as a data URI.

The clean and dedup pages and the run reports' example grids show one thumbnail per item, so
each item gets its own small JPEG (a few kB) rather than one mosaic PNG: a page of 100 items
stays well under a megabyte, captions are real text that wraps, and, like every report, the
page opens with no network and no files beside it.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

from museum.reports.html import esc

THUMB = 160  # pixels on the longer side: enough to tell what a photo shows


def thumbnail_tag(path: str | Path | None, alt: str, size: int = THUMB) -> str:
    """`<img>` of the image at `path` scaled so its longer side is `size`, or a grey note saying why it can't be shown."""
    from PIL import Image

    from museum.data.images import ImageDecodeError, safe_open_image

    if path is None:
        return '<span class="muted">no image</span>'
    try:
        img = safe_open_image(path, draft=size)
    except ImageDecodeError as exc:  # a moved or broken file still yields a page
        return f'<span class="muted">{esc(exc.reason)}</span>'
    scale = size / max(img.size)
    if scale < 1:
        img.thumbnail((size, size))
    elif scale > 1:  # small images (28-px sprites) fill the box too; blocky pixels stay sharper than blur
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.NEAREST if scale >= 2 else Image.BICUBIC)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=80)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (f'<img src="data:image/jpeg;base64,{data}" alt="{esc(alt)}" width="{img.width}" '
            f'height="{img.height}" style="margin:0;display:inline-block">')
